"""Run a compiled layer: a training step (forward + backward) and a few decoding steps.

    mirasc compile examples/moneta.miras -o build && python examples/run_example.py build/moneta.py
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch


def main(path: str, d_model: int = 256, batch: int = 2, seq: int = 128) -> None:
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    layer_cls = next(obj for obj in vars(module).values()
                     if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module.__name__)
    torch.manual_seed(0)
    layer = layer_cls(d_model)
    x = torch.randn(batch, seq, d_model)
    start = time.perf_counter()
    y, state = layer(x)
    y.square().mean().backward()
    grads = sum(p.grad is not None for p in layer.parameters())
    print(f"{layer_cls.__name__}: forward+backward on x{tuple(x.shape)} -> y{tuple(y.shape)} "
          f"in {time.perf_counter() - start:.2f} s; {grads} parameters received gradients")
    with torch.no_grad():
        for i in range(4):
            y_t, state = layer(torch.randn(batch, 1, d_model), state)
        print(f"decoded 4 tokens one at a time: last y{tuple(y_t.shape)}, |y| = {y_t.norm():.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
