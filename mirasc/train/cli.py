"""`mirasc train`'s options (every one overrides the preset's value) and the command itself."""
from __future__ import annotations

import argparse

# option, TrainConfig field, type, help
_OPTIONS = [
    ("--preset", "preset", str, "the starting configuration (default: cpu; docs/training.md)"),
    ("--data", "data", str, "a text file or a folder of text files (default: the Python standard library)"),
    ("--tokenizer", "tokenizer", str, "a local tokenizers tokenizer.json (default: bytes, vocabulary 256)"),
    ("--corpus-bytes", "corpus_bytes", int, "read at most this many bytes of the corpus"),
    ("--val-fraction", "val_fraction", float, "share of documents held out for validation (0.05)"),
    ("--d-model", "d_model", int, "model width"),
    ("--layers", "layers", int, "number of layers"),
    ("--heads", "heads", int, "memory heads (default: the preset's, else the spec's)"),
    ("--head-dim", "head_dim", int, "key and value dim per head"),
    ("--chunk-size", "chunk_size", int, "the memory's chunk size (default: the spec's)"),
    ("--intermediate-size", "intermediate_size", int, "the MLP's hidden width (default: 8/3 d_model)"),
    ("--backend", "backend", str, "the layer's backend: auto, torch, triton, reference"),
    ("--attn-every", "attn_every", int, "every n-th layer is sliding-window attention (0: none)"),
    ("--attn-window", "attn_window", int, "attention window in tokens (default: full causal)"),
    ("--attn-heads", "attn_heads", int, "attention heads (default: the memory's)"),
    ("--seq-len", "seq_len", int, "tokens per row"),
    ("--batch-size", "batch_size", int, "rows per process per micro-batch"),
    ("--grad-accum", "grad_accum", int, "micro-batches per step"),
    ("--steps", "steps", int, "optimizer steps"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr-ratio", "min_lr_ratio", float, "the cosine's end as a fraction of --lr"),
    ("--warmup", "warmup", int, "linear warmup steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip"),
    ("--seed", "seed", int, "seed of the weights and the data order"),
    ("--eval-every", "eval_every", int, "steps between validations (0: only at the end)"),
    ("--eval-batches", "eval_batches", int, "validation batches per evaluation"),
    ("--save-every", "save_every", int, "steps between checkpoints (0: only the final one)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "intermediate checkpoints kept (0: all)"),
    ("--log-every", "log_every", int, "steps between metrics.jsonl lines"),
    ("--device", "device", str, "auto (cuda when present), cpu or cuda"),
    ("--threads", "threads", int, "CPU threads per process (the CPU presets: 1; see docs/training.md)"),
    ("--out", "out", str, "run folder (default: runs/<spec stem>-<timestamp>)"),
]
_FLAGS = [
    ("--compile", "compile", True, "torch.compile the model"),
    ("--fsdp", "fsdp", True, "shard with FSDP2 instead of DDP (under torchrun)"),
    ("--no-amp", "amp", False, "no bf16 autocast on CUDA"),
    ("--no-progress", "progress", False, "no progress bar"),
    ("--untied", "tie_embeddings", False, "separate input and output embeddings"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC", help="a .miras file (optional with --resume)")
    p.add_argument("--resume", metavar="PATH", help="a checkpoint folder or a run folder (its latest)")
    from .presets import PRESETS

    choices = {"preset": list(PRESETS), "backend": ["auto", "torch", "triton", "reference"],
               "device": ["auto", "cpu", "cuda"]}
    for opt, dest, typ, text in _OPTIONS:
        p.add_argument(opt, dest=dest, type=typ, default=None, help=text, choices=choices.get(dest))
    for opt, dest, value, text in _FLAGS:
        p.add_argument(opt, dest=dest, action="store_const", const=value, default=None, help=text)


def run(args: argparse.Namespace) -> int:
    """Only the options given on the command line override the preset (or the resumed run's values)."""
    from .trainer import train

    if args.spec is None and args.resume is None:
        raise SystemExit("mirasc train: give a SPEC (or --resume PATH)")
    overrides = {dest: getattr(args, dest) for _, dest, *_ in _OPTIONS + _FLAGS
                 if getattr(args, dest) is not None}
    train(args.spec, resume=args.resume, **overrides)
    return 0
