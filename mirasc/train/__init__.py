"""mirasc train: one trainer from a CPU to many GPUs.

    from mirasc.train import train
    run = train("examples/gated_deltanet.miras", preset="cpu", steps=200)   # -> the run folder

`mirasc train SPEC [options]` is the same from the command line; docs/training.md describes both.
"""
from .presets import PRESETS
from .trainer import TrainConfig, make_config, train

__all__ = ["PRESETS", "TrainConfig", "make_config", "train"]
