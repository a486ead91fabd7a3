"""What memory() keeps for the backward with a map on an MLP memory (Memora): the torch backend, which
materialises every token's weights, against the triton backend, whose read-out walks the tokens in
Triton kernels (runs on the CPU in Triton's interpreter; the bytes are the same on a GPU).

    PYTHONPATH=. python benchmarks/map_readout_memory.py [--spec examples/memora.miras] [--dim 16] [--seq 256]

Counts the bytes of every tensor autograd saves during one forward (each storage once; q, k, v, the gates
and the initial state included, alike for both), per token and head. Timings are not taken: the
interpreter's are meaningless.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the generated module defines its kernels

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirasc.testing import compile_module, make_inputs, make_state


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(sizes.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "memora.miras"))
    ap.add_argument("--dim", type=int, default=16, help="head dims K = V")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    text = Path(args.spec).read_text()
    module, compiled = compile_module(text, args.spec, tempfile.mkdtemp(), "_map_readout_memory")
    ir = compiled.ir
    B, T, H, K = 1, args.seq, args.heads, args.dim
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, K, dtype=torch.float32, seed=0)
    s0 = make_state(ir, B, H, K, K, gen=gen)
    leaves = [x.requires_grad_() for x in (q, k, v, *params.values(), *s0)]
    chunk = ir.algorithm.chunk
    print(f"# {ir.name}: B={B}, T={T}, H={H}, K=V={K}, chunk {chunk}, state "
          f"{sum(s.numel() for s in s0) // (B * H)} values per head; kernels: {module.TRITON_KERNELS}\n")
    print("| backend | saved for the backward (MB) | per token and head (KB) |")
    print("|---|---:|---:|")
    rows = {}
    for backend in ("torch", "triton"):
        def run(backend=backend):
            return module.memory(*leaves[:3], **dict(zip(params, leaves[3:3 + len(params)])),
                                 initial_state=tuple(leaves[3 + len(params):]), chunk_size=chunk, backend=backend)
        rows[backend] = saved_bytes(run)
        print(f"| {backend} | {rows[backend] / 2**20:.2f} | {rows[backend] / (B * T * H) / 2**10:.1f} |")
    print(f"\ntorch / triton: {rows['torch'] / rows['triton']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
