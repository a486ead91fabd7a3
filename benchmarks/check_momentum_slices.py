"""Matrix-memory momentum kernels with a head run as value-column slices, on the GPU: lp(p=3) + decay,
momentum, chunk 64, bf16, against the torch backend in float32 (outputs and every gradient).

    python benchmarks/check_momentum_slices.py

Wide heads run as slices by themselves (`_value_slices`: K = V = 128 in bf16 takes 2); the K = V = 64
rows force 2 slices to reach the same code path at a second tile width. Each case runs in its own
process, so that a fault (an illegal memory access poisons the CUDA context) loses only its own row.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [(128, 8, None), (128, 8, 4), (64, 16, 1), (64, 16, 2)]  # K = V, heads, forced slices (None: the module's)


def one(D: int, H: int, n: int | None) -> None:
    import tempfile

    import torch
    sys.path.insert(0, str(ROOT))
    import benchmarks.bench_linear as bl
    from benchmarks.common import import_spec, rel, stable_ranges
    from mirasc.testing import make_inputs

    bias, ret, alg, decls = bl.LAYERS["lp(p=3) + decay, momentum (chunk 64)"]
    text = "\n".join(["layer Slices {", f"    heads {H}", f"    key_dim {D}", f"    value_dim {D}",
                      "    memory linear", *("    " + d for d in decls), f"    bias {bias}",
                      f"    retention {ret}", f"    algorithm {alg}", "}"])
    module, ir = import_spec(text, "slices.miras", Path(tempfile.mkdtemp()), "_slices_")
    chosen = module._value_slices(D, D, 64, torch.bfloat16)
    if n is not None:
        module._value_slices = lambda K, V, chunk, dtype: n
    q, k, v, params, _ = make_inputs(ir, 2, 1024, H, D, D, dtype=torch.float32, device="cuda",
                                     ranges=stable_ranges(ir))
    out = {}
    for backend, dt in (("triton", torch.bfloat16), ("torch", torch.float32)):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        leaves += [x.detach().clone().requires_grad_() for x in params.values()]
        o = module.memory(*leaves[:3], **dict(zip(params, leaves[3:])), backend=backend)[0]
        (o.float() * torch.linspace(-1, 1, o.shape[-1], device="cuda")).sum().backward()
        torch.cuda.synchronize()
        out[backend] = [o.float(), *(x.grad.float() for x in leaves)]
    err = max(rel(a, b) for a, b in zip(out["triton"], out["torch"]))
    print(f"| {D} | {H} | {chosen} | {n or chosen} | {err:.1e} | {'PASS' if err < 1e-2 else 'FAIL'} |", flush=True)


def main() -> int:
    if len(sys.argv) == 4:
        one(int(sys.argv[1]), int(sys.argv[2]), None if sys.argv[3] == "-" else int(sys.argv[3]))
        return 0
    print("| K = V | H | slices the module picks | slices run | max rel err (o, grads) vs torch fp32 | verdict |")
    print("|---|---|---|---|---|---|", flush=True)
    for D, H, n in CASES:
        r = subprocess.run([sys.executable, __file__, str(D), str(H), "-" if n is None else str(n)],
                           check=False, capture_output=True, text=True, timeout=120)
        rows = [line for line in r.stdout.splitlines() if line.startswith("|")]
        if rows:
            print(rows[-1], flush=True)
        else:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:150]
            print(f"| {D} | {H} | | {n} | {tail} | FAIL |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
