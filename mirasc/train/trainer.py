"""The trainer: one loop from a CPU to many GPUs (DDP or FSDP2 under torchrun), with exact resume.

What makes resume exact: the batch of a step depends only on (seed, step) (data.py), the weights and the
optimizer's moments are stored in full precision, the learning rate follows the step, and the RNG
states are stored. N ranks read disjoint slices of the same global batch and the loss is normalised by
the tokens of the whole global batch, so the curve equals one process's with the same global batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .data import (
    PackedStream,
    TrainData,
    load_documents,
    make_tokenizer,
    split_documents,
    unigram_entropy,
    validation_batches,
)
from .presets import DEFAULT_PRESET, PRESETS

STATE_FILE = "trainer_state.pt"
STEP_FILE = "checkpoint.json"        # the step (and tokens, val_bpb) of a checkpoint, readable without torch
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


@dataclass
class TrainConfig:
    """Everything a run depends on. `train()` fills it from a preset and overrides; it is stored in
    every checkpoint (and in the run folder as train_config.json)."""

    spec: str = ""                      # the spec's text
    spec_file: str = "layer.miras"      # its file name (names the run folder and the LM's spec file)
    preset: str = DEFAULT_PRESET
    # data
    data: str | None = None             # a text file or a folder; None = the standard library
    tokenizer: str | None = None        # a local tokenizer.json; None = bytes (vocabulary 256)
    corpus_bytes: int | None = None     # cap on the corpus (None: the default corpus's cap, else all)
    val_fraction: float = 0.05
    # model
    d_model: int = 128
    layers: int = 2
    heads: int | None = None            # None: the spec's
    head_dim: int | None = None         # None: the spec's
    chunk_size: int | None = None       # None: the spec's
    intermediate_size: int | None = None  # None: the LM's default
    backend: str = "auto"
    attn_every: int = 0                 # a sliding-window attention layer every n layers (0: none)
    attn_window: int | None = None
    attn_heads: int | None = None
    tie_embeddings: bool = True
    # optimisation
    seq_len: int = 128
    batch_size: int = 16                # rows per process per micro-batch
    grad_accum: int = 1
    steps: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1           # the cosine ends at lr * min_lr_ratio
    warmup: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # running
    eval_every: int = 100
    eval_batches: int = 8               # validation size, in global batches of rows
    save_every: int = 0                 # 0: only the final checkpoint
    keep_checkpoints: int = 2           # intermediate checkpoint folders kept (0: all)
    log_every: int = 1
    compile: bool = False
    fsdp: bool = False
    device: str = "auto"                # auto (cuda when present), cpu, cuda
    threads: int | None = None          # CPU threads per process (None: torch's default)
    amp: bool = True                    # bf16 autocast on CUDA (never on CPU)
    progress: bool = True
    out: str | None = None              # the run folder; None: runs/<spec stem>-<timestamp>
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    @property
    def stem(self) -> str:
        return Path(self.spec_file).stem


def _spec_source(spec: str | os.PathLike) -> tuple[str, str]:
    """(text, file name) of a spec given as a path or as text."""
    text = str(spec)
    if "{" not in text:
        path = Path(text)
        try:
            return path.read_text(encoding="utf-8"), path.name
        except OSError as exc:
            raise SystemExit(f"mirasc train: cannot read {text}: {exc.strerror}") from None
    import re

    match = re.search(r"\blayer\s+(\w+)", text)
    return text, f"{match.group(1).lower() if match else 'layer'}.miras"


def make_config(spec: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a preset (overrides['preset'], default cpu) and overrides; unknown keys fail."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(sorted(unknown))}")
    preset = overrides.get("preset") or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    if spec is not None:
        values["spec"], values["spec_file"] = _spec_source(spec)
    if not values.get("spec"):
        raise ValueError("no spec given")
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------------- setup

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False                 # this trainer created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """torch.distributed from torchrun's environment (nccl on CUDA, gloo on CPU); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return Dist()
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned=True)


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(kind)


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """MirascForCausalLM for the config; None fields keep the LM's (or the spec's) defaults."""
    from mirasc.lm import MirascConfig, MirascForCausalLM

    kwargs = {"spec": cfg.spec, "spec_file": cfg.spec_file, "vocab_size": vocab_size,
              "hidden_size": cfg.d_model, "num_hidden_layers": cfg.layers, "backend": cfg.backend,
              "attn_every": cfg.attn_every, "tie_word_embeddings": cfg.tie_embeddings}
    for key in ("heads", "head_dim", "chunk_size", "intermediate_size", "attn_window", "attn_heads"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    return MirascForCausalLM(MirascConfig(**kwargs))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases, gates' scalars and embeddings are left alone."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then a cosine from 1 to min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _shard(model: torch.nn.Module) -> None:
    """FSDP2: every module of the outermost ModuleLists (the layers) is a unit, then the root. Module lists
    inside a layer stay in their layer's unit (FSDP2 shards bottom-up, never a child of a sharded unit)."""
    from torch.distributed.fsdp import fully_shard

    inside: set[int] = set()
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList) and id(module) not in inside:
            for block in module:
                inside.update(id(m) for m in block.modules())
                fully_shard(block)
    fully_shard(model)


# ------------------------------------------------------------------------------------------ checkpoints

_FULL = {"full_state_dict": True, "cpu_offload": True}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, cfg: TrainConfig, dd: Dist,
                    extra: dict) -> None:
    """save_pretrained (config, safetensors, spec) plus trainer_state.pt, as full (unsharded) tensors, so
    a checkpoint of N processes resumes on any number. Every rank calls it (FSDP gathers); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(**_FULL)
    model_sd = get_model_state_dict(model, options=opts)
    # a tied weight is stored once, under its first name (gathered copies no longer share storage)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            model_sd.pop(name, None)
        seen.add(id(p))
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if dd.main:
        from transformers.utils import logging as hf_logging

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp, state_dict=model_sd, safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        torch.save({"step": step, "config": dataclasses.asdict(cfg), "optimizer": optim_sd,
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(), "world_size": dd.world,
                    **extra}, tmp / STATE_FILE)
        (tmp / STEP_FILE).write_text(json.dumps({"step": step, **extra}) + "\n")
        # files move into place one by one (the folder may be the run folder itself); trainer_state.pt
        # goes last, so a folder that has it holds a complete checkpoint
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_FILE).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == STATE_FILE):
            os.replace(f, folder / f.name)
        tmp.rmdir()
    if dd.world > 1:
        dist.barrier()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weights = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(load_file(folder / shard))
        return weights
    return load_file(folder / "model.safetensors")


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Weights, optimizer, scheduler and RNG from a checkpoint folder; returns its trainer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    weights = _read_weights(folder)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(model, weights, options=opts)
    params = dict(model.named_parameters())
    loaded = {id(params[k]) for k in weights if k in params}
    untied = [k for k in missing if k in params and id(params[k]) not in loaded]
    if untied or unexpected:
        raise RuntimeError(f"{folder}: checkpoint does not fit the model (missing {untied}, "
                           f"unexpected {list(unexpected)})")
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def _checkpoint_step(folder: Path) -> int:
    info = folder / STEP_FILE
    if info.exists():
        return json.loads(info.read_text())["step"]
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)["step"]


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder to resume from: a checkpoint-<step> folder itself, else the latest (highest
    step) of a run folder's checkpoints and its final state (a run resumed into its own folder can have
    checkpoints newer than the final state of its first part)."""
    path = Path(path)
    found = [p for p in path.glob("checkpoint-*")
             if (p / STATE_FILE).exists() and not p.name.endswith(".tmp")]
    if (path / STATE_FILE).exists():
        if path.name.startswith("checkpoint-"):
            return path
        found.append(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}")
    return max(found, key=_checkpoint_step)


def _run_folder_of(checkpoint: Path) -> Path:
    return checkpoint.parent if checkpoint.name.startswith("checkpoint-") else checkpoint


def _prune(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")),
                   key=lambda p: int(p.name.split("-")[-1]))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- logging

def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_metrics_until(src: Path, dst: Path, step: int) -> None:
    """metrics.jsonl up to a resumed step (lines after it belong to the interrupted future)."""
    rows = [r for r in read_metrics(src) if r["step"] <= step]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_curves(out: Path, entropy: float | None = None, title: str = "") -> Path:
    """curves.png: training and validation bits per byte against tokens seen, and the unigram entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out / METRICS_FILE)
    train = [r for r in rows if "bpb" in r]
    val = [r for r in rows if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.11, top=0.93)   # fixed margins: no layout pass
    if train:
        x = [r["tokens"] for r in train]
        y = [r["bpb"] for r in train]
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
        smooth, ema = [], y[0]
        for v in y:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(x, smooth, color="tab:blue", label="train (EMA 0.9)")
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_bpb"] for r in val], "o-", color="tab:orange",
                label="validation")
    if entropy is not None:
        ax.axhline(entropy, color="gray", linestyle="--", label=f"unigram entropy {entropy:.3f}")
    ys = [r["bpb"] for r in train] + [r["val_bpb"] for r in val]
    if ys:
        top = max(min(ys[:5] + [r["val_bpb"] for r in val[:1]]), (entropy or 0) * 1.3)
        ax.set_ylim(max(0.0, min(ys) * 0.9), min(max(ys), top) * 1.05)
    ax.set_xlabel("tokens")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / CURVES_FILE
    fig.savefig(path.with_suffix(".tmp.png"))
    plt.close(fig)
    os.replace(path.with_suffix(".tmp.png"), path)
    return path


def _default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------------------------- training

def _autocast(device: torch.device, cfg: TrainConfig):
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _all_sum(values: list[float], dd: Dist, device: torch.device) -> list[float]:
    if dd.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, batches, device, cfg: TrainConfig, dd: Dist,
             bytes_per_token: float) -> tuple[float, float]:
    """(mean loss in nats per predicted token, bits per byte) over the validation batches of all ranks."""
    model.eval()
    nats, count = 0.0, 0
    filler = next((b for b in batches if b is not None), None)
    for batch in batches:
        real = batch is not None
        batch = (batch if real else filler)
        if batch is None:   # this rank has nothing at all; ranks must still run the same forwards
            continue
        batch = batch.to(device)
        n = batch.n_targets if real else 0
        with _autocast(device, cfg):
            out = model(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
        if n:
            nats += float(out.loss.float()) * n
            count += n
    model.train()
    nats, count = _all_sum([nats, float(count)], dd, device)
    loss = nats / max(count, 1.0)
    return loss, loss / math.log(2) / bytes_per_token


def train(spec: str | os.PathLike | None = None, *, model_fn=None, resume: str | os.PathLike | None = None,
          **overrides) -> Path:
    """Train a causal LM around the spec's layer and return the run folder.

    spec: a .miras path or the spec's text (optional with `resume`). overrides: any TrainConfig field,
    e.g. preset="tiny", steps=100, data="corpus/", out="runs/x". resume: a checkpoint folder or a run
    folder (its latest checkpoint); the run continues exactly where it stopped, with the checkpoint's
    configuration and the overrides given here (e.g. more steps). model_fn(cfg, vocab_size) replaces
    the model (default: MirascForCausalLM).
    """
    checkpoint, explicit = None, {k for k, v in overrides.items() if v is not None}
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)["config"]
        if spec is not None:
            text, _ = _spec_source(spec)
            if text.strip() != saved["spec"].strip():
                raise ValueError(f"the spec differs from the one of {checkpoint}")
        out = overrides.pop("out", None) or str(_run_folder_of(checkpoint))
        cfg = TrainConfig(**{**saved, **{k: v for k, v in overrides.items() if v is not None}, "out": out})
    else:
        cfg = make_config(spec, **overrides)

    probe = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dd = init_distributed(probe)
    try:
        run = _train(cfg, dd, model_fn, checkpoint, explicit)
        if dd.owned:  # every rank is done (rank 0 writes last) before any tears the group down
            dist.barrier()
        return run
    finally:
        if dd.owned:
            dist.destroy_process_group()


def _keep_global_batch(cfg: TrainConfig, saved: dict, world: int, explicit: set[str]) -> TrainConfig:
    """On another number of processes, the per-process batch that keeps the checkpoint's global batch
    (so the run goes on exactly as it would have), unless --batch-size or --grad-accum was given."""
    rows = saved["global_rows"]
    if world * cfg.batch_size * cfg.grad_accum == rows or {"batch_size", "grad_accum"} & explicit:
        return cfg
    if rows % (world * cfg.grad_accum):
        raise ValueError(f"the checkpoint's global batch of {rows} rows does not divide over {world} "
                         f"processes x {cfg.grad_accum} micro-batches; give --batch-size / --grad-accum")
    return dataclasses.replace(cfg, batch_size=rows // (world * cfg.grad_accum))


def memory_backend_line(cfg: TrainConfig, device: torch.device) -> str:
    """Which backend the layers' memory() runs in this training run, and why when it is the slow one (read
    from the generated module, which the model has already compiled and imported)."""
    if cfg.backend not in ("auto", "triton"):
        return f"memory layers: backend {cfg.backend!r} (as asked)"
    if device.type != "cuda":
        return "memory layers: the torch backend (the fused Triton kernels run on CUDA)"
    from mirasc import load_source

    module = load_source(cfg.spec, cfg.spec_file)
    if module.TRITON_KERNELS is None:
        return (f"memory layers: the torch backend, slower and larger in memory than fused kernels: "
                f"{module.TRITON_REASON}")
    if module.TRITON_KERNELS == "MLP map read-out":
        return "memory layers: the torch backend with every token's read-out through the map in Triton kernels"
    return f"memory layers: fused Triton kernels ({module.TRITON_KERNELS} memory)"


def _say(dd: Dist, *parts) -> None:
    if dd.main:
        print(*parts, flush=True)


def _train(cfg: TrainConfig, dd: Dist, model_fn, checkpoint: Path | None, explicit: set[str]) -> Path:
    wall_start = time.perf_counter()
    step0 = row0 = 0
    if checkpoint is not None:
        saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
        step0, row0 = saved["step"], saved["data_rows"]
        cfg = _keep_global_batch(cfg, saved, dd.world, explicit)
    device = _device(cfg, dd.local_rank)
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    if dd.world > 1:   # one timestamp for all ranks
        box = [str(out)]
        dist.broadcast_object_list(box, src=0)
        out = Path(box[0])
    cfg = dataclasses.replace(cfg, out=str(out))

    # data
    tokenizer = make_tokenizer(cfg.tokenizer)
    docs, source = load_documents(cfg.data, cfg.corpus_bytes)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    entropy = unigram_entropy(train_docs)
    train_stream = PackedStream(train_docs, tokenizer, cfg.seq_len, seed=cfg.seed, shuffle=True)
    val_stream = PackedStream(val_docs, tokenizer, cfg.seq_len, shuffle=False)
    global_rows = cfg.batch_size * dd.world * cfg.grad_accum
    data = TrainData(train_stream, global_rows, step0, row0)
    # eval_batches global batches of validation rows, the same rows for any number of processes
    val = validation_batches(val_stream, cfg.batch_size, cfg.eval_batches * global_rows, dd.rank, dd.world)

    # model and optimiser
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = (model_fn or build_model)(cfg, tokenizer.vocab_size)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.fsdp and dd.world == 1:   # e.g. an FSDP run's checkpoint resumed in one process
        _say(dd, "one process: FSDP is not used")
        cfg = dataclasses.replace(cfg, fsdp=False)
    if cfg.fsdp:
        _shard(model)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  fused=device.type == "cuda" and not cfg.fsdp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        start_step = state["step"]
    runner = model
    if dd.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)

    metrics = out / METRICS_FILE
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None:
            _keep_metrics_until(_run_folder_of(checkpoint) / METRICS_FILE, metrics, start_step)
        elif metrics.exists():
            metrics.unlink()
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tokens_per_step = global_rows * cfg.seq_len
    _say(dd, f"mirasc train: {cfg.spec_file} (preset {cfg.preset}), {n_params:,} parameters, "
             f"{dd.world} process{'es' if dd.world > 1 else ''} on {device.type}"
             f"{', FSDP2' if cfg.fsdp else ', DDP' if dd.world > 1 else ''}")
    _say(dd, f"corpus: {source}: {len(docs)} documents, train {train_stream.n_bytes:,} bytes "
             f"({train_stream.n_tokens:,} tokens), validation {val_stream.n_bytes:,} bytes")
    _say(dd, f"unigram entropy of the training bytes: {entropy:.3f} bits per byte")
    if cfg.spec:
        _say(dd, memory_backend_line(cfg, device))
    _say(dd, f"{cfg.steps} steps of {global_rows} x {cfg.seq_len} tokens "
             f"({data.epoch(cfg.steps):.2f} epochs); run folder {out}")

    def log(row: dict) -> None:
        if dd.main:
            with metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(step: int) -> tuple[float, float]:
        loss, bpb = evaluate(runner, val, device, cfg, dd, val_stream.bytes_per_token)
        log({"step": step, "tokens": data.first_row(step) * cfg.seq_len, "val_loss": loss, "val_bpb": bpb})
        if dd.main:
            plot_curves(out, entropy, f"{cfg.stem}: {n_params:,} parameters")
        return loss, bpb

    def checkpoint_extra(val_bpb):
        return {"unigram_entropy": entropy, "n_params": n_params, "val_bpb": val_bpb,
                "tokens": data.first_row(step) * cfg.seq_len, "data_rows": data.first_row(step),
                "global_rows": global_rows}

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (dd.main and cfg.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    val_loss = val_bpb = None
    if start_step == 0 and cfg.eval_every > 0:
        val_loss, val_bpb = run_eval(0)
    train_time, train_tokens = 0.0, 0
    bpt_train = train_stream.bytes_per_token
    model.train()
    step = start_step
    while step < cfg.steps:
        t0 = time.perf_counter()
        n_global = data.global_targets(step)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = data.rows(step, (micro * dd.world + dd.rank) * cfg.batch_size, cfg.batch_size).to(device)
            n = batch.n_targets
            sync = micro == cfg.grad_accum - 1 or not hasattr(runner, "no_sync")
            with contextlib.nullcontext() if sync else runner.no_sync():
                with _autocast(device, cfg):
                    out_ = runner(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
                # the mean over this slice, weighted to its share of the global batch's tokens; DDP and
                # FSDP average gradients over ranks, hence the factor world
                scale = n * dd.world / max(n_global, 1)
                loss = out_.loss * scale if n else out_.logits.sum() * 0.0
                loss.backward()
            if n:
                loss_sum += float(out_.loss.detach().float()) * n
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        (loss_sum,) = _all_sum([loss_sum], dd, device)
        train_loss = loss_sum / max(n_global, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        train_time += dt
        train_tokens += tokens_per_step
        step += 1
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"step {step}: the training loss is {train_loss}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            log({"step": step, "loss": train_loss, "bpb": train_loss / math.log(2) / bpt_train, "lr": lr,
                 "grad_norm": float(grad_norm), "tokens": data.first_row(step) * cfg.seq_len,
                 "tokens_per_s": tokens_per_step / dt, "time": time.perf_counter() - wall_start})
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{train_tokens / train_time:,.0f}",
                        val_bpb="-" if val_bpb is None else f"{val_bpb:.3f}", refresh=False)
        if step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            val_loss, val_bpb = run_eval(step)
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(out / f"checkpoint-{step}", model, optimizer, scheduler, step, cfg, dd,
                            checkpoint_extra(val_bpb))
            if dd.main:
                _prune(out, cfg.keep_checkpoints)
    bar.close()
    if not (checkpoint == out and step == start_step):   # the run folder holds the final checkpoint
        save_checkpoint(out, model, optimizer, scheduler, step, cfg, dd, checkpoint_extra(val_bpb))
    tok_s = train_tokens / train_time if train_time else 0.0
    wall = time.perf_counter() - wall_start
    summary = {"spec_file": cfg.spec_file, "preset": cfg.preset, "n_params": n_params, "steps": step,
               "tokens": data.first_row(step) * cfg.seq_len, "unigram_entropy": entropy, "val_loss": val_loss,
               "val_bpb": val_bpb, "tokens_per_s": tok_s, "wall_s": wall, "world_size": dd.world,
               "device": device.type}
    if dd.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if val_bpb is not None:
        verdict = "below" if val_bpb < entropy else "NOT below"
        _say(dd, f"final validation: {val_bpb:.3f} bits per byte, {verdict} the unigram entropy "
                 f"{entropy:.3f} ({val_bpb - entropy:+.3f})")
    _say(dd, f"{tok_s:,.0f} tokens/s over {train_time:.1f} s of training, {wall:.1f} s in all; "
             f"run folder {out}")
    return out
