"""Launch settings and host cost of the matrix-memory kernels on the GPU: per layer, each (warps, stages)
setting's kernel times (torch.profiler, device time per call), the layer's fwd and fwd+bwd
(triton.testing.do_bench), agreement with the shipped setting, and the share of the non-finite guard.

    python benchmarks/tune_linear.py [--out FILE]    # needs CUDA; B=8, T=2048, H=16, K=V=64, bf16

A layer's launch setting is the generated module's `_LAUNCH` dict; this script overrides it in place
for each trial (the kernels recompile per setting) and restores it. "guard off" replaces the
non-finite guard (`_nonfinite_reach`) with a pass-through for one timing, to show its cost.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec, rel, stable_ranges
from mirasc.testing import make_inputs

B, T, H, D = 8, 2048, 16, 64
GATE_A = "gate a : head = sigmoid(rank=4, init=0.97)"
LAYERS = {  # name: (bias, retention, algorithm, declarations)
    "lp(p=3) + decay, gd (chunk 64)": ("lp(p=3)", "decay(a)", "gd(lr=eta, chunk=64)", [GATE_A]),
    "lp(p=3) + decay, momentum (chunk 64)": ("lp(p=3)", "decay(a)", "momentum(beta=0.9, lr=eta, chunk=64)",
                                             [GATE_A]),
    "lp(p=3) + per-channel decay, gd (chunk 64)": ("lp(p=3)", "decay(a)", "gd(lr=eta, chunk=64)",
                                                   ["gate a : channel = sigmoid(rank=4, init=0.97)"]),
}
SETTINGS = [(4, None), (4, 1), (8, 1), (8, 2)]


def spec(i: int, bias: str, retention: str, algorithm: str, decls: list[str]) -> str:
    return "\n".join([f"layer Tune{i} {{", f"    heads {H}", f"    key_dim {D}", f"    value_dim {D}",
                      "    memory linear", *("    " + d for d in decls),
                      "    gate eta : head = softplus(rank=4, init=0.1)", f"    bias {bias}",
                      f"    retention {retention}", f"    algorithm {algorithm}", "}"])


def kernel_ms(fn, n: int = 10) -> dict:
    """Device time per call of each Triton kernel that fn launches (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("_chunk") or e.key.startswith("_nonfinite"):
            out[e.key] = e.device_time_total / n / 1e3
    return out


def tune(i: int, name: str, decl: tuple) -> list[str]:
    """The table rows of one layer: every launch setting, then the shipped one without the guard."""
    module, ir = import_spec(spec(i, *decl), f"tune{i}.miras", Path(tempfile.mkdtemp()), "_tune_")
    q, k, v, params, _ = make_inputs(ir, B, T, H, D, D, dtype=torch.float32, device="cuda",
                                     ranges=stable_ranges(ir))
    leaves = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    pleaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    do = torch.randn_like(leaves[2])

    def fwd():
        with torch.no_grad():
            return module.memory(*leaves, **pleaves, backend="triton")[0]

    def fwd_bwd():
        o = module.memory(*leaves, **pleaves, backend="triton")[0]
        return [o, *torch.autograd.grad(o, [*leaves, *pleaves.values()], do)]

    rows = []
    shipped = dict(module._LAUNCH)
    ref = [x.float() for x in fwd_bwd()]
    for warps, stages in SETTINGS:
        module._LAUNCH.clear()
        module._LAUNCH.update({"num_warps": warps, **({} if stages is None else {"num_stages": stages})})
        label = f"{warps}/{stages or 'default'}{' (shipped)' if module._LAUNCH == shipped else ''}"
        try:
            err = max(rel(a.float(), b) for a, b in zip(fwd_bwd(), ref))
            ks = kernel_ms(fwd_bwd)
            t_f = triton.testing.do_bench(fwd, return_mode="median")
            t_fb = triton.testing.do_bench(fwd_bwd, return_mode="median")
            cells = [label, f"{ks.get('_chunk_fwd_kernel', 0):.3f}", f"{ks.get('_chunk_bwd_kernel', 0):.3f}",
                     f"{ks.get('_nonfinite_rows_kernel', 0):.3f}", f"{t_f:.3f}", f"{t_fb:.3f}", f"{err:.1e}"]
        except Exception as exc:  # noqa: BLE001 -- a setting that fails to compile is a row too
            cells = [label, f"{type(exc).__name__}: {str(exc)[:60]}", "", "", "", "", ""]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    module._LAUNCH.clear()
    module._LAUNCH.update(shipped)
    guard = module._nonfinite_reach
    module._nonfinite_reach = lambda q, k, v, gates, cu: (None, q, k, v, gates)
    t_f = triton.testing.do_bench(fwd, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, return_mode="median")
    module._nonfinite_reach = guard
    rows.append(f"| {name} | shipped, guard off | | | | {t_f:.3f} | {t_fb:.3f} | |")
    print(rows[-1], flush=True)
    rows.append(f"| {name} | non-finite guard on the GPU | {guard_check(module, leaves, pleaves)} | | | | | |")
    print(rows[-1], flush=True)
    return rows


def guard_check(module, leaves, pleaves) -> str:
    """A nan in v (row 0, token 1000, head 3) and an inf in the first gate (row 1, token 500, head 5):
    the outputs before them equal the clean run's, and every later token of that row and head is nan."""
    with torch.no_grad():
        clean = module.memory(*leaves, **pleaves, backend="triton")[0].float()
        v = leaves[2].detach().clone()
        v[0, 1000, 3, 7] = float("nan")
        gates = {n: p.detach().clone() for n, p in pleaves.items()}
        name, g = next((n, x) for n, x in gates.items() if x.dim() >= 3)
        g[1, 500, 5] = float("inf")
        o = module.memory(leaves[0], leaves[1], v, **gates, backend="triton")[0].float()
    hit = torch.zeros(o.shape[:3], dtype=torch.bool, device=o.device)
    hit[0, 1000:, 3] = True
    hit[1, 500:, 5] = True
    nan_rows = torch.isnan(o).any(-1)
    ok = torch.equal(nan_rows, hit) and torch.equal(o[~hit], clean[~hit])
    return f"{'PASS' if ok else 'FAIL'} (nan in v, inf in {name})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = [(f"# Matrix-memory launch settings: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}; B={B}, T={T}, H={H}, K=V={D}, bf16"), "",
             ("ms: kernels = device time per call (profiler); fwd, fwd+bwd = do_bench median of the layer "
              "call (host time included where the host is slower); agreement = max rel err of o and every "
              "gradient against the shipped setting."), "",
             "| layer | warps/stages | fwd kernel | bwd kernel | guard kernel | fwd | fwd+bwd | agreement |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for i, (name, decl) in enumerate(LAYERS.items()):
        lines += tune(i, name, decl)
    table = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
