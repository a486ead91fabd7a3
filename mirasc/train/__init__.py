"""mirasc train: one trainer from a CPU to many GPUs.

    from mirasc.train import train
    run = train("examples/gated_deltanet.miras", preset="cpu", steps=200)   # -> the run folder

`mirasc train SPEC [options]` is the same from the command line; docs/training.md describes both.
The names load on first use, so the command line's parser does not import torch.
"""
from __future__ import annotations

__all__ = ["PRESETS", "TrainConfig", "make_config", "train"]


def __getattr__(name: str):
    if name == "PRESETS":
        from .presets import PRESETS

        return PRESETS
    if name in ("TrainConfig", "make_config", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
