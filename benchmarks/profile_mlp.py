"""One forward + backward of bench_mlp.py's MLP lp(p=3) layer (B=8, T=2048, H=16, K=V=64, bf16), to run
under Nsight Compute on a GPU for the MLP kernels' occupancy, spills and stall reasons:

    for k in _mlp_fwd_kernel _mlp_bwd_kernel; do
      ncu --clock-control none --kernel-name $k --launch-skip 1 --launch-count 1 \\
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        --section MemoryWorkloadAnalysis python benchmarks/profile_mlp.py
    done

The first call compiles (and is skipped by --launch-skip 1); the second is the one profiled.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_mlp as bm


def main() -> None:
    module, ir = bm.compile_layer("MLP lp(p=3)")
    q, k, v, params, state = bm.inputs(ir)
    leaves = [x.requires_grad_() for x in (q, k, v, *params.values(), *state)]
    for _ in range(2):
        o = bm.run_memory(module, leaves, list(params), len(state), "triton")[0]
        o.float().sum().backward()
    torch.cuda.synchronize()
    print("ok", flush=True)


if __name__ == "__main__":
    main()
