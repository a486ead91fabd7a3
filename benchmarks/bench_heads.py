"""Matrix memories with wide heads on the GPU: agreement with the torch backend, then speed.

    python benchmarks/bench_heads.py            # writes $OUT/heads.md when $OUT is set
    python benchmarks/bench_heads.py --smoke    # tiny shapes in Triton's CPU interpreter

The lp(p=3) + decay layer (benchmarks/common.py) at B=4, T=2048 and H x V = 1024 with head dims
K = V = 64, 128 and 256, at chunk 64 and 16. Heads whose state does not fit one program run as column
slices (docs/semantics.md, "Head dims"); the table names the slices each configuration runs as, or
"torch" where the triton backend refuses it. Agreement: the triton backend on bf16 inputs against the
torch backend in float32 on the same values: outputs, final state and the gradients of q, k, v and the
gates, relative error < 1e-2. Speed: median ms of triton.testing.do_bench, forward and forward +
backward, triton beside the torch backend. Every figure is printed as soon as it is measured.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec, lp_decay_spec, median_ms, rel
from mirasc.testing import make_inputs, make_state

B, T, WIDTH = (1, 40, 256) if SMOKE else (4, 2048, 1024)
DIMS = (64, 256) if SMOKE else (64, 128, 256)
CHUNKS = (16,) if SMOKE else (64, 16)
DEV = "cpu" if SMOKE else "cuda"


def inputs(ir, H: int, D: int, seed: int = 0):
    """[q, k, v (bf16), a in (0.99, 1), eta in (0.05, 0.1), S ~ 0.1 N(0, 1)] for the lp layer."""
    ranges = {"a": (0.99, 1.0), "eta": (0.05, 0.1)}
    q, k, v, gates, g = make_inputs(ir, B, T, H, D, D, dtype=torch.float32, seed=seed, device=DEV,
                                    ranges=lambda p: ranges[p.name])
    s0 = make_state(ir, B, H, D, D, dtype=torch.float32, gen=g, scale=0.1 * D ** 0.5, device=DEV)
    return [q.bfloat16(), k.bfloat16(), v.bfloat16(), gates["a"], gates["eta"], s0]


def run(module, leaves, chunk, backend, weights=None):
    q, k, v, a, eta, s0 = leaves
    o, s = module.memory(q, k, v, a=a, eta=eta, initial_state=s0, output_final_state=True, chunk_size=chunk,
                         backend=backend)
    if weights is not None:
        ((o.float() * weights[0]).sum() + (s * weights[1]).sum()).backward()
    return o, s




def main() -> None:
    device = "cpu (TRITON_INTERPRET=1)" if SMOKE else torch.cuda.get_device_name(0)
    rows = [(f"# Wide heads: lp(p=3) + decay, B={B}, T={T}, H x V = {WIDTH}, bf16; {device}, torch "
             f"{torch.__version__}, triton {triton.__version__}\n"),
            "| K = V | H | chunk | runs as | worst rel err | triton fwd | triton fwd+bwd | torch fwd | torch fwd+bwd |",
            "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    out = Path(tempfile.mkdtemp())
    for D in DIMS:
        H = WIDTH // D
        for chunk in CHUNKS:
            module, ir = import_spec(lp_decay_spec(H, D, chunk), f"heads{D}.miras", out, f"_heads{D}_{chunk}_")
            base = inputs(ir, H, D)
            why = module._triton_usable(base[0], base[2], chunk)
            if why is not None:
                row = f"| {D} | {H} | {chunk} | torch ({why[:60]}...) | | | | | |"
                rows.append(row)
                print(row, flush=True)
                continue
            n = module._value_slices(D, D, chunk, torch.bfloat16)
            g = torch.Generator(device=DEV).manual_seed(1)
            weights = [torch.randn(B, T, H, D, device=DEV, generator=g), torch.randn(B, H, D, D, device=DEV, generator=g)]
            tri = [x.detach().clone().requires_grad_() for x in base]
            ref = [x.detach().float().clone().requires_grad_() for x in base]
            outs = run(module, tri, chunk, "triton", weights)
            ref_outs = run(module, ref, chunk, "torch", weights)
            errs = [rel(a, b) for a, b in zip(outs, ref_outs)] + [rel(a.grad, b.grad) for a, b in zip(tri, ref)]
            finite = all(torch.isfinite(x.grad).all().item() for x in tri)
            worst = max(errs) if finite else float("nan")
            nograd = [x.detach() for x in base]
            times = []
            for backend in ("triton", "torch"):
                times.append(median_ms(lambda m=module, x=nograd, c=chunk, b=backend: run(m, x, c, b), SMOKE))
                times.append(median_ms(lambda m=module, x=tri, c=chunk, b=backend, w=weights: run(m, x, c, b, w), SMOKE))
            verdict = "" if worst < 1e-2 else " FAIL"
            row = (f"| {D} | {H} | {chunk} | {n} slice{'s' if n > 1 else ''} | {worst:.1e}{verdict} | "
                   + " | ".join(f"{t:.3f}" for t in times) + " |")
            rows.append(row)
            print(row, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "heads.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
