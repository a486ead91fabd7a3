"""Text in, text out for byte-level MirascForCausalLM checkpoints (what `mirasc generate` runs)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .model import output_cache


def find_model_dir(path: str | Path) -> Path:
    """A folder with config.json: `path` itself, else its highest-step checkpoint-* subfolder (a run folder)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    found = [p for p in path.glob("checkpoint-*")
             if (p / "config.json").exists() and not p.name.endswith(".tmp") and p.name.split("-")[-1].isdigit()]
    if not found:
        raise FileNotFoundError(f"{path}: no config.json, and no checkpoint-* folder holding one")
    return max(found, key=lambda p: int(p.name.split("-")[-1]))


def load_model(path: str | Path, device: str | None = None):
    """AutoModelForCausalLM.from_pretrained on the folder find_model_dir picks, in eval mode."""
    from transformers import AutoModelForCausalLM

    import mirasc.lm  # noqa: F401  (registers model_type "mirasc")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(find_model_dir(path)).to(device).eval()


@torch.no_grad()
def generate_bytes(model, prompt: bytes, max_new_tokens: int = 200, temperature: float = 0.0,
                   seed: int = 0) -> tuple[bytes, dict]:
    """Continue `prompt` token by token through the cache (greedy for temperature 0, else sampling from
    softmax(logits / temperature)) -> (the new bytes, timings: prefill_ms, ms_per_token, tokens)."""
    if model.config.vocab_size != 256:
        raise ValueError(f"byte-level generation needs vocab_size 256, the model has {model.config.vocab_size}")
    if not prompt:
        raise ValueError("the prompt is empty")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1, keepdim=True)
        probs = torch.softmax(logits.float() / temperature, -1)
        return torch.multinomial(probs, 1, generator=gen)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = pick(out.logits[:, -1])
    sync()
    prefill = time.perf_counter() - start
    new = [token]
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=token, cache=output_cache(out))
        token = pick(out.logits[:, -1])
        new.append(token)
    sync()
    steps = max(max_new_tokens - 1, 1)
    text = bytes(torch.cat(new, 1)[0].tolist()[:max_new_tokens])
    return text, {"prefill_ms": 1e3 * prefill, "ms_per_token": 1e3 * (time.perf_counter() - start) / steps,
                  "tokens": len(text)}
