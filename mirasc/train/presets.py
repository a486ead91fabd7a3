"""Named training configurations. Every value can be overridden (`mirasc train --layers 4 ...`).

`batch_size` is per process (per GPU); the global batch is batch_size x world size x grad_accum rows of
seq_len tokens.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # seconds on a CPU: for tests and for trying the command
    "tiny": {"d_model": 32, "layers": 1, "heads": 2, "head_dim": 16, "seq_len": 64, "batch_size": 4,
             "steps": 20, "lr": 3e-3, "warmup": 2, "eval_every": 10, "eval_batches": 2, "save_every": 0,
             "corpus_bytes": 300_000, "val_fraction": 0.1, "threads": 1},
    # the default: ~0.9M parameters, a few minutes on two CPU cores, below the unigram entropy
    "cpu": {"d_model": 128, "layers": 3, "heads": 2, "head_dim": 64, "seq_len": 128, "batch_size": 8,
            "steps": 300, "lr": 3e-3, "warmup": 20, "eval_every": 50, "eval_batches": 4, "save_every": 150,
            "threads": 1},
    # one GPU, minutes: a quick check of a layer at a real width
    "gpu-small": {"d_model": 512, "layers": 8, "heads": 8, "head_dim": 64, "seq_len": 1024, "batch_size": 16,
                  "steps": 2000, "lr": 1e-3, "warmup": 200, "eval_every": 250, "eval_batches": 16,
                  "save_every": 1000},
    # ~125M-class (GPT-2 small's shape)
    "gpu-125m": {"d_model": 768, "layers": 12, "heads": 12, "head_dim": 64, "seq_len": 2048, "batch_size": 16,
                 "grad_accum": 2, "steps": 20000, "lr": 6e-4, "warmup": 1000, "weight_decay": 0.1,
                 "eval_every": 1000, "eval_batches": 32, "save_every": 2000},
    # the paper's 340M configuration (d_model 1024, 24 layers, 16 heads of 64, 4096 tokens); on 8 GPUs
    # the global batch is 8 x 8 x 2 rows x 4096 = 0.5M tokens, 30000 steps = 15B tokens
    "gpu-340m": {"d_model": 1024, "layers": 24, "heads": 16, "head_dim": 64, "seq_len": 4096, "batch_size": 8,
                 "grad_accum": 2, "steps": 30000, "lr": 3e-4, "warmup": 1000, "weight_decay": 0.1,
                 "eval_every": 1000, "eval_batches": 32, "save_every": 2000},
}

DEFAULT_PRESET = "cpu"
