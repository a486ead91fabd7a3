"""One forward + backward of bench_mlp.py's MLP lp(p=3) layer (B=8, T=2048, H=16, K=V=64, bf16), to run
under Nsight Compute on a GPU for the MLP kernels' occupancy, spills and stall reasons:

    for k in _mlp_write_kernel _mlp_read_kernel _mlp_bwd_kernel; do
      ncu --clock-control none --kernel-name $k --launch-skip 1 --launch-count 1 \\
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        --section MemoryWorkloadAnalysis python benchmarks/profile_mlp.py
    done

The first call compiles (and is skipped by --launch-skip 1); the second is the one profiled.

With --times it instead prints each kernel's GPU time (torch.profiler, mean over 5 forward + backward
calls) and the registers and spills of every compiled MLP kernel; --layer picks another of bench_mlp's
layers and --cfg sets launch settings as bench_mlp's does (JSON {attr: dict}).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_mlp as bm


def step(module, ir, leaves, names, n_state) -> None:
    for x in leaves:
        x.grad = None
    o = bm.run_memory(module, leaves, names, n_state, "triton")[0]
    o.float().sum().backward()


def kernel_resources(module) -> list[str]:
    """'name: regs, spills' of each compiled variant of the module's MLP kernels (Triton's JIT caches);
    the kernels are the module's _mlp_*_kernel functions, whichever the layer's template emitted."""
    rows = []
    for name in sorted(n for n in vars(module) if n.startswith("_mlp_") and n.endswith("_kernel")):
        fn = getattr(module, name)
        try:
            for cache in getattr(fn, "device_caches", {}).values():
                for compiled in cache[0].values():
                    rows.append(f"{name}: {compiled.n_regs} registers, {compiled.n_spills} spilled")
        except (AttributeError, IndexError, TypeError) as exc:  # Triton's caches are internal
            rows.append(f"{name}: resources not readable ({type(exc).__name__})")
    return rows


def warmed(layer: str, cfgs: dict | None) -> tuple:
    """The layer's module with the launch settings, after two steps (compiled): step()'s arguments."""
    module, ir = bm.compile_layer(layer)
    bm.set_configs(module, cfgs)
    q, k, v, params, state = bm.inputs(ir)
    leaves = [x.requires_grad_() for x in (q, k, v, *params.values(), *state)]
    args = (module, ir, leaves, list(params), len(state))
    for _ in range(2):
        step(*args)
    torch.cuda.synchronize()
    return args


def times(layer: str, cfgs: dict | None) -> None:
    args = warmed(layer, cfgs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(*args)
        torch.cuda.synchronize()
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print(f"{ev.key[:60]:60s} {ev.device_time_total / 5 / 1000:8.3f} ms per step ({ev.count // 5} calls)")
    for row in kernel_resources(args[0]):
        print(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--times", action="store_true", help="per-kernel GPU times and registers")
    ap.add_argument("--layer", default="MLP lp(p=3)", help="a layer of bench_mlp.py")
    ap.add_argument("--cfg", help="launch settings, JSON {attr: dict}")
    args = ap.parse_args()
    cfgs = json.loads(args.cfg) if args.cfg else None
    if args.times:
        times(args.layer, cfgs)
    else:
        warmed(args.layer, cfgs)
        print("ok", flush=True)


if __name__ == "__main__":
    main()
