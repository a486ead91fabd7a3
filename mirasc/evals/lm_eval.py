"""Language-model evals of a trained run (a `mirasc train` run folder or a saved model folder).

- `bpb(run)`: validation bits per byte, on the run's own validation split (mirasc.train.data rebuilt
  from the run's train_config.json), optionally at another row length than the training one.
- `bpb_by_position(run)`: the same tokens' loss grouped by their offset in their document segment, in
  power-of-two buckets: does the loss keep falling as the context grows (and past the training length)?
- `chunk_consistency(run)`: the run reloaded with other chunk sizes (MirascConfig.chunk_size) and
  evaluated on the same tokens; the change in bpb against the training chunk. Layers whose update does
  not depend on the state inside a chunk (a dot-product bias: linear attention, RetNet) compute the
  same function at every chunk size; others (the delta rule, l_p biases, MLP memories) approximate
  the token-by-token recurrence more coarsely as the chunk grows (Behrouz et al. 2025, §3.3: the
  gradient of a chunk is taken at the state of the chunk's start).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100


def run_files(run: str | os.PathLike) -> tuple[Path, dict]:
    """(the folder with config.json to load, the run's training configuration from train_config.json)."""
    from mirasc.lm.generate import find_model_dir

    model_dir = find_model_dir(run)
    for folder in (Path(run), model_dir, model_dir.parent):
        path = folder / "train_config.json"
        if path.exists():
            return model_dir, json.loads(path.read_text())
    raise FileNotFoundError(f"{run}: no train_config.json (a `mirasc train` run folder is needed to rebuild "
                            f"its validation data)")


def load_run_model(run: str | os.PathLike, chunk_size: int | None = None, device: str | None = None):
    """The run's model in eval mode; chunk_size overrides the memory layers' chunk size."""
    from transformers import AutoModelForCausalLM

    import mirasc.lm  # noqa: F401  (registers model_type "mirasc")
    from mirasc.lm.generate import find_model_dir

    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(find_model_dir(run), **kwargs).to(device).eval()


def training_chunk(model) -> int | None:
    """The chunk size the model's memory layers run with (None: no memory layer)."""
    for layer in model.model.layers:
        if layer.kind == "memory":
            return int(layer.mixer.chunk_size)
    return None


def validation_rows(train_cfg: dict, seq_len: int | None = None, max_rows: int = 64):
    """The first max_rows rows (tokens, document-start flags) of the run's validation stream and its
    bytes per token, built exactly as the trainer builds them (same documents, split and packing)."""
    from mirasc.train.data import PackedStream, load_documents, make_tokenizer, split_documents

    docs, _ = load_documents(train_cfg.get("data"), train_cfg.get("corpus_bytes"))
    _, val_docs = split_documents(docs, train_cfg.get("val_fraction", 0.05))
    stream = PackedStream(val_docs, make_tokenizer(train_cfg.get("tokenizer")),
                          seq_len or train_cfg["seq_len"], shuffle=False)
    n = min(stream.rows_per_epoch, max_rows)
    return [stream.row(i) for i in range(n)], stream.bytes_per_token


@torch.no_grad()
def token_losses(model, rows, batch_rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(nats [N], positions [N]) of every predicted token of the rows. The rows are packed as in
    training (every document and every row from a fresh memory); a token's position is its offset in
    its segment (1: predicted from one token of context)."""
    from mirasc.train.data import pack_rows

    device = next(model.parameters()).device
    nats, positions = [], []
    for i in range(0, len(rows), batch_rows):
        batch = pack_rows(rows[i:i + batch_rows])
        logits = model(input_ids=batch.input_ids.to(device), cu_seqlens=batch.cu_seqlens.to(device)).logits
        logits = logits[0, :-1].float().cpu()
        targets = batch.labels[0, 1:]
        total = batch.input_ids.shape[1]
        seg_start = torch.zeros(total, dtype=torch.long)
        cu = batch.cu_seqlens.long()
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            seg_start[a:b] = a
        pos = torch.arange(1, total) - seg_start[1:]
        keep = targets != IGNORE
        nats.append(F.cross_entropy(logits[keep], targets[keep], reduction="none"))
        positions.append(pos[keep])
    return torch.cat(nats), torch.cat(positions)


def _bits(nats: torch.Tensor, bytes_per_token: float) -> float:
    return float(nats.double().mean()) / math.log(2) / bytes_per_token


def bpb(run: str | os.PathLike, seq_len: int | None = None, max_rows: int = 64, model=None,
        chunk_size: int | None = None) -> dict:
    """Validation bits per byte of a run: {"bpb", "tokens", "seq_len"}."""
    model_dir, train_cfg = run_files(run)
    model = model or load_run_model(model_dir, chunk_size)
    rows, bpt = validation_rows(train_cfg, seq_len, max_rows)
    nats, _ = token_losses(model, rows)
    return {"bpb": _bits(nats, bpt), "tokens": int(nats.numel()), "seq_len": seq_len or train_cfg["seq_len"]}


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """[1, 2), [2, 4), [4, 8), ... up to seq_len (positions are 1 .. seq_len - 1)."""
    out, lo = [], 1
    while lo < seq_len:
        out.append((lo, min(2 * lo, seq_len)))
        lo *= 2
    return out


def bucket_bits(nats: torch.Tensor, positions: torch.Tensor, seq_len: int, bytes_per_token: float) -> list[dict]:
    """Mean bits per byte of the tokens in each position bucket (empty buckets left out)."""
    out = []
    for lo, hi in position_buckets(seq_len):
        sel = (positions >= lo) & (positions < hi)
        if bool(sel.any()):
            out.append({"lo": lo, "hi": hi, "bpb": _bits(nats[sel], bytes_per_token), "tokens": int(sel.sum())})
    return out


def bpb_by_position(run: str | os.PathLike, seq_len: int | None = None, max_rows: int = 64, model=None) -> dict:
    """{"bpb", "seq_len", "train_len", "buckets": [{"lo", "hi", "bpb", "tokens"}]} on the validation rows;
    seq_len above the training length shows whether more context than trained on still helps."""
    model_dir, train_cfg = run_files(run)
    model = model or load_run_model(model_dir)
    T = seq_len or train_cfg["seq_len"]
    rows, bpt = validation_rows(train_cfg, T, max_rows)
    nats, pos = token_losses(model, rows)
    return {"bpb": _bits(nats, bpt), "seq_len": T, "train_len": train_cfg["seq_len"],
            "buckets": bucket_bits(nats, pos, T, bpt)}


def chunk_consistency(run: str | os.PathLike, chunks: list[int] | None = None, seq_len: int | None = None,
                      max_rows: int = 32) -> dict:
    """bpb of the run at every chunk size in `chunks` (default 1, 4, 16, 64 and the training chunk) on
    the same validation tokens: {"train_chunk", "results": [{"chunk", "bpb", "delta"}]}, delta against
    the training chunk."""
    model_dir, train_cfg = run_files(run)
    base_model = load_run_model(model_dir)
    train_chunk = training_chunk(base_model)
    if train_chunk is None:
        raise ValueError(f"{run}: the model has no memory layer (chunk sizes do not apply)")
    rows, bpt = validation_rows(train_cfg, seq_len, max_rows)
    sizes = sorted(set(chunks or [1, 4, 16, 64]) | {train_chunk})
    if any(c < 1 or c > 256 for c in sizes):
        raise ValueError(f"chunk sizes must be in 1..256, got {sizes}")
    values = {}
    for c in sizes:
        model = base_model if c == train_chunk else load_run_model(model_dir, c)
        values[c] = _bits(token_losses(model, rows)[0], bpt)
    base = values[train_chunk]
    return {"train_chunk": train_chunk, "seq_len": seq_len or train_cfg["seq_len"],
            "results": [{"chunk": c, "bpb": v, "delta": v - base} for c, v in values.items()]}
