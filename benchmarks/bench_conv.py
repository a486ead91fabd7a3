"""The blocks' short causal depthwise convolution, two ways: nn.Conv1d (groups = channels) on the
transposed [B, C, T] input, and a sum of the window's shifted slices in the [B, T, C] layout.

    PYTHONPATH=. python benchmarks/bench_conv.py [--batch 4] [--seq 4096] [--width 3072] [--window 4]

Forward and forward+backward (gradients of the input and of the weights), median ms, on CUDA under bf16
autocast (as training runs it) or on the CPU in fp32; the two agree within the dtype's rounding (checked
and printed first). PyTorch's depthwise convolution is known to be slow on CUDA
(pytorch/pytorch#75747), which this measures at the blocks' shape.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def conv1d(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d's depthwise convolution: padded [B, T + W - 1, C], weight [C, 1, W] -> [B, T, C]."""
    return F.conv1d(padded.transpose(1, 2), weight, groups=weight.shape[0]).transpose(1, 2)


def slices(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same as a sum over the window: out_t = sum_s w_s * padded_(t + s), in fp32 (fp64 stays)."""
    W = weight.shape[-1]
    T = padded.shape[1] - W + 1
    acc = torch.promote_types(padded.dtype, torch.float32)
    w = weight[:, 0].t().to(acc)  # [W, C]
    out = padded[:, 0:T].to(acc) * w[0]
    for s in range(1, W):
        out = out + padded[:, s:s + T].to(acc) * w[s]
    return out.to(padded.dtype)


def timed(fn, sync, n: int = 20) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--window", type=int, default=4)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    B, T, C, W = args.batch, args.seq, args.width, args.window
    x = torch.randn(B, T + W - 1, C, device=dev, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(C, 1, W, device=dev, generator=gen) / W).requires_grad_()
    dy = torch.randn(B, T, C, device=dev, dtype=dtype, generator=gen)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"# B={B}, T={T}, C={C}, window {W}, {dtype}, {where}, torch {torch.__version__}")
    outs = {}
    for name, fn in (("nn.Conv1d depthwise", conv1d), ("shifted slices", slices)):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            y = fn(x, weight)
        outs[name] = [y.detach().float(), *(g.float() for g in torch.autograd.grad(y, [x, weight], dy))]
    a, b = outs.values()
    err = max(float((p - q).norm() / q.norm()) for p, q in zip(a, b))
    print(f"agreement (max rel err of y, dx, dw): {err:.1e}")
    print("| method | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for name, fn in (("nn.Conv1d depthwise", conv1d), ("shifted slices", slices)):
        def fwd(fn=fn):
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                return fn(x, weight)

        def fwd_bwd(fn=fn):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                y = fn(x, weight)
            return torch.autograd.grad(y, [x, weight], dy)

        print(f"| {name} | {timed(fwd, sync):.3f} | {timed(fwd_bwd, sync):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
