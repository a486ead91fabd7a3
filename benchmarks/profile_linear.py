"""Where the time of one matrix-memory memory() call goes on the GPU (torch.profiler), and which
backends stay finite for a layer at full shape.

    python benchmarks/profile_linear.py [--spec FILE] [--finite]

Prints the CUDA kernels and the host-side ops of 20 forward calls (bf16, B=8, T=2048, H=16, K=V=64), the
median time of memory() against the fused operator alone, and with --finite whether the triton (bf16 and
fp32), torch and reference (fp32) backends give finite outputs on the benchmarks' inputs.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec, lp_decay_spec
from mirasc.testing import long_sequence_range, make_inputs

B, T, H, D = 8, 2048, 16, 64


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=None)
    ap.add_argument("--finite", action="store_true")
    args = ap.parse_args()
    text = lp_decay_spec(H, D) if args.spec is None else Path(args.spec).read_text()
    for word, value in (("heads", H), ("key_dim", D), ("value_dim", D)):
        text = re.sub(rf"^(\s*){word}\s+\d+", rf"\g<1>{word} {value}", text, flags=re.MULTILINE)
    module, ir = import_spec(text, "profiled.miras", Path(tempfile.mkdtemp()), "_profile_")
    q, k, v, params, _ = make_inputs(ir, B, T, H, D, D, dtype=torch.float32, device="cuda",
                                     ranges=lambda p: (0.02, 0.1) if p.name == "eta" else (0.5, 0.9) if p.name == "mu" else long_sequence_range(p))
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))

    def call():
        return module.memory(qb, kb, vb, **params, backend="triton")[0]

    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        print(f"memory(): {triton.testing.do_bench(call, warmup=25, rep=100, return_mode='median'):.3f} ms",
              flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                call()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
    if args.finite:
        for backend, dt in (("triton", torch.bfloat16), ("triton", torch.float32), ("torch", torch.float32),
                            ("reference", torch.float32)):
            with torch.no_grad():
                o = module.memory(q.to(dt), k.to(dt), v.to(dt), **params, backend=backend)[0]
            bad = (~torch.isfinite(o)).any(-1)  # [B, T, H]
            first = bad.float().argmax(1)  # first non-finite token per (batch, head)
            print(f"{backend} {dt}: finite {bool(torch.isfinite(o).all())}, non-finite tokens "
                  f"{int(bad.sum())} / {bad.numel()}, earliest {int(first[bad.any(1)].min()) if bad.any() else '-'}"
                  f", max |o| {float(o[torch.isfinite(o)].abs().max()):.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
