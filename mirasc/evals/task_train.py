"""Train a MirascForCausalLM on a synthetic recall task's own generated data, then score it on a grid.

    from mirasc.evals import train_task
    result = train_task("examples/gated_deltanet.miras", task="mqar", steps=300)
    result["accuracy"]          # {"T=64 N=2": 1.0, ...}

The loss falls only on answer tokens (the task's targets), the batch of step s is a function of
(seed, s), and the weights start from torch.manual_seed(seed), so two specs trained with the same
settings see the same sequences in the same order. The run folder holds the saved model
(save_pretrained), task.json (the settings), metrics.jsonl (one line per step) and result.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tasks import Filler, MQARSpec, PasskeySpec, TaskBatch, mix_seed, mqar_batch, passkey_batch, score

TASKS = ("mqar", "passkey")
BASELINE = "attention"     # the name of the softmax-attention baseline (attn_every=1)
EVAL_SALT = 1 << 40        # evaluation seeds never meet training seeds


@dataclass
class TaskConfig:
    """A task run: the model, the optimisation and the task's training and evaluation settings."""

    task: str = "mqar"
    # model (MirascConfig); None keeps the spec's
    d_model: int = 64
    layers: int = 2
    heads: int | None = 2
    head_dim: int | None = 32
    chunk_size: int | None = None
    attn_every: int = 0            # 1: every layer softmax attention (the baseline)
    backend: str = "auto"
    # optimisation
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = 1
    # MQAR: training sequences of train_len tokens with 1..train_pairs pairs; scored at every
    # (eval_len, pairs) with pairs <= eval_len / 4
    train_len: int | None = None   # None: 64 (mqar), 128 (passkey)
    train_pairs: int = 8
    mqar_vocab: int = 64           # keys from bytes 1..mqar_vocab, values from 128..128 + mqar_vocab - 1
    eval_lens: list[int] | None = None      # None: [train_len, 2 train_len] (mqar); 1, 2, 4, 8 x (passkey)
    eval_pairs: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    # passkey: haystack of "random" letters or "text" (the standard library corpus), needle depths
    filler: str = "random"
    digits: int = 5
    eval_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    eval_samples: int = 64         # sequences per evaluation setting
    progress: bool = True

    def resolved(self) -> TaskConfig:
        """A copy with the length defaults filled in and the settings checked."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; tasks: {', '.join(TASKS)}")
        cfg = dataclasses.replace(self)
        if cfg.train_len is None:
            cfg.train_len = 64 if cfg.task == "mqar" else 128
        if cfg.eval_lens is None:
            cfg.eval_lens = ([cfg.train_len, 2 * cfg.train_len] if cfg.task == "mqar"
                             else [cfg.train_len * m for m in (1, 2, 4, 8)])
        if cfg.task == "mqar":
            cfg.mqar_spec().check(cfg.train_pairs, cfg.train_len)
        else:
            PasskeySpec(digits=cfg.digits)
            if cfg.filler not in ("random", "text"):
                raise ValueError(f"filler must be 'random' or 'text', got {cfg.filler!r}")
        return cfg

    def mqar_spec(self) -> MQARSpec:
        if not 1 <= self.mqar_vocab <= 127:
            raise ValueError(f"mqar_vocab must be in 1..127, got {self.mqar_vocab}")
        return MQARSpec(1, 1 + self.mqar_vocab, 128, 128 + self.mqar_vocab)

    def budget(self) -> dict:
        """The settings two models must share to be compared (everything but the model's own kind)."""
        d = dataclasses.asdict(self)
        for key in ("progress", "attn_every", "chunk_size", "backend", "threads"):
            d.pop(key)
        return d


# ------------------------------------------------------------------------------------------ batches

_FILLERS: dict[tuple[str, str], Filler] = {}


def filler_for(kind: str, split: str) -> Filler:
    """The passkey haystack source; "text" cuts the standard-library corpus (mirasc.train's default
    corpus, 1 MB of it) into its training and validation documents, so test haystacks are unseen text."""
    key = (kind, split)
    if key not in _FILLERS:
        if kind == "random":
            _FILLERS[key] = Filler("random")
        else:
            from mirasc.train.data import load_documents, split_documents

            docs, _ = load_documents(None, 1_000_000)
            train_docs, val_docs = split_documents(docs, 0.1)
            _FILLERS[key] = Filler([d.data for d in (train_docs if split == "train" else val_docs)])
    return _FILLERS[key]


def train_batch(cfg: TaskConfig, step: int) -> TaskBatch:
    """The training batch of a step: a function of (cfg.seed, step) and the task settings."""
    seed = mix_seed(cfg.seed, step)
    if cfg.task == "mqar":
        pairs = 1 + int(torch.randint(0, cfg.train_pairs, (1,), generator=torch.Generator().manual_seed(seed)))
        return mqar_batch(cfg.batch_size, pairs, cfg.train_len, seed + 1, cfg.mqar_spec())
    return passkey_batch(cfg.batch_size, cfg.train_len, seed, None, filler_for(cfg.filler, "train"),
                         PasskeySpec(digits=cfg.digits))


def eval_settings(cfg: TaskConfig) -> list[dict]:
    """Every scored setting: {"name", "seq_len", and "pairs" (mqar) or "depth" (passkey)}."""
    out = []
    if cfg.task == "mqar":
        for T in cfg.eval_lens:
            for n in cfg.eval_pairs:
                if 4 * n <= T and n <= cfg.mqar_vocab:
                    out.append({"name": f"T={T} N={n}", "seq_len": T, "pairs": n})
    else:
        for T in cfg.eval_lens:
            for d in cfg.eval_depths:
                out.append({"name": f"T={T} depth={d:g}", "seq_len": T, "depth": d})
    return out


def eval_batch(cfg: TaskConfig, setting: dict, index: int, batch: int) -> TaskBatch:
    seed = mix_seed(cfg.seed, EVAL_SALT, setting["seq_len"], int(1000 * setting.get("depth", 0)),
                    setting.get("pairs", 0), index)
    if cfg.task == "mqar":
        return mqar_batch(batch, setting["pairs"], setting["seq_len"], seed, cfg.mqar_spec())
    return passkey_batch(batch, setting["seq_len"], seed, setting["depth"], filler_for(cfg.filler, "val"),
                         PasskeySpec(digits=cfg.digits))


# ---------------------------------------------------------------------------------------------- model

def build_model(spec_text: str | None, spec_file: str, cfg: TaskConfig):
    """MirascForCausalLM at the run's width; attn_every=1 (with any spec, or none) is all attention."""
    from mirasc.lm import MirascConfig, MirascForCausalLM

    kwargs = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.layers, "attn_every": cfg.attn_every,
              "backend": cfg.backend, "spec": spec_text, "spec_file": spec_file}
    for key in ("heads", "head_dim", "chunk_size"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if cfg.attn_every == 1 and cfg.heads:
        kwargs["attn_heads"] = cfg.heads
    return MirascForCausalLM(MirascConfig(**kwargs))


def read_spec(spec: str | os.PathLike | None) -> tuple[str | None, str]:
    """(text, file name) of a spec given as a path or as text; None for the attention baseline."""
    if spec is None:
        return None, "attention.miras"
    text = str(spec)
    if "{" in text:
        import re

        m = re.search(r"\blayer\s+(\w+)", text)
        return text, f"{m.group(1).lower() if m else 'layer'}.miras"
    path = Path(text)
    return path.read_text(encoding="utf-8"), path.name


@torch.no_grad()
def evaluate_task(model, cfg: TaskConfig, settings: list[dict] | None = None, batch: int = 16,
                  bar=None) -> dict[str, float]:
    """Accuracy per setting over cfg.eval_samples sequences: per answer token for MQAR, per sequence
    (all digits right, i.e. greedy decoding's exact match) for the passkey."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for setting in settings or eval_settings(cfg):
        right = total = 0
        for i in range(math.ceil(cfg.eval_samples / batch)):
            n = min(batch, cfg.eval_samples - i * batch)
            tb = eval_batch(cfg, setting, i, n)
            logits = model(input_ids=tb.input_ids.to(device)).logits.float().cpu()
            r, t = score(logits, tb, per_sequence=cfg.task == "passkey")
            right, total = right + r, total + t
        out[setting["name"]] = right / max(total, 1)
        if bar is not None:
            bar.update(0)
    return out


def _lr(step: int, cfg: TaskConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_task(spec: str | os.PathLike | None, task: str = "mqar", *, out: str | os.PathLike | None = None,
               name: str | None = None, on_step=None, **overrides) -> dict:
    """Train the LM around `spec` (None: the attention baseline, attn_every=1) on `task`'s generated
    data and score it. overrides: any TaskConfig field. on_step(step, loss) is called after every step
    (the comparison's progress bar). Returns the result dict (also written to out/result.json)."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TaskConfig)}
    if unknown:
        raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
    cfg = TaskConfig(task=task, **{k: v for k, v in overrides.items() if v is not None})
    if spec is None:
        cfg.attn_every = 1
    cfg = cfg.resolved()
    text, spec_file = read_spec(spec)
    name = name or (BASELINE if spec is None and cfg.attn_every == 1 else Path(spec_file).stem)
    out = Path(out) if out else Path("runs") / f"{task}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(text, spec_file, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "norm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, cfg))
    (out / "task.json").write_text(json.dumps({"name": name, "spec_file": spec_file, **dataclasses.asdict(cfg)},
                                              indent=2) + "\n")
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, disable=not cfg.progress or on_step is not None, unit="step",
               desc=f"{name} {task}", dynamic_ncols=True, file=sys.stderr)
    metrics = (out / "metrics.jsonl").open("w")
    wall0 = time.perf_counter()
    train_time, tokens = 0.0, 0
    model.train()
    loss_value = float("nan")
    for step in range(cfg.steps):
        tb = train_batch(cfg, step)
        t0 = time.perf_counter()
        o = model(input_ids=tb.input_ids.to(device), labels=tb.hf_labels().to(device))
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(o.loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{name}: step {step + 1}: the loss is {loss_value}")
        dt = time.perf_counter() - t0
        train_time += dt
        tokens += tb.input_ids.numel()
        r, t = score(o.logits.detach().float().cpu(), tb)
        metrics.write(json.dumps({"step": step + 1, "loss": loss_value, "train_acc": r / max(t, 1),
                                  "tokens": tokens, "tokens_per_s": tb.input_ids.numel() / dt}) + "\n")
        metrics.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if on_step is not None:
            on_step(step + 1, loss_value)
    metrics.close()
    bar.close()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        hf_logging.enable_progress_bar()
    eval_t0 = time.perf_counter()
    accuracy = evaluate_task(model, cfg)
    result = {"name": name, "spec_file": spec_file, "task": task, "n_params": n_params, "steps": cfg.steps,
              "final_loss": loss_value, "tokens": tokens, "tokens_per_s": tokens / max(train_time, 1e-9),
              "train_s": train_time, "eval_s": time.perf_counter() - eval_t0,
              "wall_s": time.perf_counter() - wall0, "accuracy": accuracy, "settings": eval_settings(cfg),
              "budget": cfg.budget(), "run": str(out)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_task_config(run: str | os.PathLike) -> TaskConfig:
    """The TaskConfig a task run was trained with (its task.json)."""
    data = json.loads((Path(run) / "task.json").read_text())
    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    return TaskConfig(**{k: v for k, v in data.items() if k in fields})
