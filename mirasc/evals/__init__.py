"""Recall and language-modeling evals, and the comparison report (docs/evals.md).

    from mirasc.evals import train_task, compare
    train_task("examples/gated_deltanet.miras", task="mqar")          # -> result dict (and a run folder)
    compare(["examples/gated_deltanet.miras", "examples/retnet.miras"], task="mqar")   # -> report folder

The names load on first use, so the command line's parser does not import torch.
"""
from __future__ import annotations

__all__ = ["TaskConfig", "bpb", "bpb_by_position", "chunk_consistency", "compare", "evaluate_task",
           "mqar_batch", "passkey_batch", "train_task"]

_WHERE = {"TaskConfig": "task_train", "train_task": "task_train", "evaluate_task": "task_train",
          "compare": "compare", "bpb": "lm_eval", "bpb_by_position": "lm_eval",
          "chunk_consistency": "lm_eval", "mqar_batch": "tasks", "passkey_batch": "tasks"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
