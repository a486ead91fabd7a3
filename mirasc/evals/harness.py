"""lm-evaluation-harness (EleutherAI's `lm_eval`, 0.4.x) adapter: the model name "mirasc".

A saved mirasc model is byte level and has no Hugging Face tokenizer, so `--model hf` cannot load it;
this module registers a model class of its own with lm_eval's registry. Importing it registers the name,
and running it as a module runs lm_eval's command line with the name registered:

    python -m mirasc.evals.harness run --model mirasc --model_args pretrained=RUN_DIR \
        --tasks lambada_openai --include_path my_tasks/

or from Python: `lm_eval.simple_evaluate(model="mirasc", model_args="pretrained=RUN_DIR", ...)` after
`import mirasc.evals.harness`. RUN_DIR is a saved model folder or a training run folder (its latest
checkpoint). model_args: pretrained, device (cpu / cuda), chunk_size (override), max_length (context
kept, from the left; default: unlimited, the memory is recurrent), max_gen_toks (default 256).

Text is UTF-8 encoded and every byte is a token. A byte-level model has no BOS token: a request with an
empty context, and loglikelihood_rolling's first byte, are scored after a newline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

PREFIX = b"\n"    # the context of a request whose own context is empty


@register_model("mirasc")
class MirascLM(LM):
    """lm_eval's three request types on a MirascForCausalLM, one request at a time."""

    def __init__(self, pretrained: str, device: str | None = None, chunk_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, batch_size=1, **_ignored):
        super().__init__()
        from .lm_eval import load_run_model

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"     # lm_eval's command line asks for cuda by default
        self.model = load_run_model(pretrained, int(chunk_size) if chunk_size else None, device)
        if self.model.config.vocab_size != 256:
            raise ValueError("the mirasc lm_eval model is byte level: vocab_size must be 256")
        self._device = next(self.model.parameters()).device
        self.max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return "bytes"

    def _ids(self, data: bytes) -> torch.Tensor:
        return torch.tensor([list(data)], dtype=torch.long, device=self._device)

    @torch.no_grad()
    def _continuation_logprob(self, context: bytes, continuation: bytes) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce it."""
        context = context or PREFIX
        data = context + continuation
        if self.max_length and len(data) > self.max_length:
            data = data[-self.max_length:]
        n = len(continuation)
        logits = self.model(input_ids=self._ids(data)).logits[0, -n - 1:-1].float()
        targets = self._ids(continuation)[0]
        logp = F.log_softmax(logits, -1)
        total = float(logp.gather(1, targets[:, None]).sum())
        return total, bool((logits.argmax(-1) == targets).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            result = self._continuation_logprob(context.encode("utf-8"), continuation.encode("utf-8"))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            data = text.encode("utf-8")
            value = self._continuation_logprob(b"", data)[0] if data else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
            out.append(value)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding through the recurrent cache until a stop string or max_gen_toks bytes."""
        from mirasc.lm.model import output_cache

        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            data = context.encode("utf-8") or PREFIX
            if self.max_length and len(data) > self.max_length:
                data = data[-self.max_length:]
            o = self.model(input_ids=self._ids(data), use_cache=True, logits_to_keep=1)
            new = bytearray()
            while len(new) < limit:
                token = o.logits[:, -1].argmax(-1, keepdim=True)
                new.append(int(token))
                text = new.decode("utf-8", errors="ignore")
                if any(s and s in text for s in until):
                    break
                o = self.model(input_ids=token, cache=output_cache(o))
            text = new.decode("utf-8", errors="replace")
            for s in until:
                if s and s in text:
                    text = text[:text.index(s)]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def main() -> None:
    """lm_eval's command line with the "mirasc" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
