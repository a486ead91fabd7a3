"""Value-column slices for matrix-memory layers on the GPU: time with a head's state run as n slices.

    python benchmarks/bench_slices.py [--out DIR] [--smoke]

A layer whose bias reads each value column on its own (and whose decay and learning rate are per head or
per column) evolves its state's columns independently, so the generated module may run a head as n
programs over V / n columns each (`_value_slices`, today the fewest slices that fit). More slices mean
smaller register tiles and n times the programs (B * H = 128 programs at the shape below, on 132 SMs),
at the price of recomputing the key-side products per slice. This script forces n = 1, 2, 4 and times
fwd and fwd+bwd (median ms, B=8, T=2048, H=16, K=V=64, bf16), checking that every n gives the n = 1
outputs and gradients to bf16 rounding.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchmarks.bench_linear as bl

NAMES = ["lp(p=3) + decay (chunk 64)", "lp(p=3) + decay, momentum (chunk 64)",
         "lp(p=3) + per-channel decay (chunk 64)", "quantile + decay, gd (chunk 16)"]


def run(module, ir, n, leaves, p):
    real = module._value_slices
    module._value_slices = lambda K, V, chunk, dtype: n
    try:
        return module.memory(*leaves[:3], **p, backend="triton")[0]
    finally:
        module._value_slices = real


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cpu (TRITON_INTERPRET=1)" if SMOKE else torch.cuda.get_device_properties(0).name
    head = (f"# Value-column slices of matrix-memory layers\n\n{datetime.date.today()} · {device} · torch "
            f"{torch.__version__} · triton {triton.__version__} · B={bl.B}, T={bl.T}, H={bl.H}, K=V={bl.D}, bf16\n")
    rows = [head, "| layer | slices n | fwd | fwd+bwd | max rel diff o, grads vs n = 1 |", "|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for i, name in enumerate(NAMES):
        module, ir = bl.compile_layer(100 + i, *bl.LAYERS[name])
        q, k, v, params = bl.inputs(ir)
        base = None
        for n in (1, 2, 4):
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, *params.values())]
            p = dict(zip(params, leaves[3:]))
            try:
                o = run(module, ir, n, leaves, p)
                o.float().square().sum().backward()
            except Exception as exc:  # noqa: BLE001 - a slicing the layer refuses is reported
                rows.append(f"| {name} | {n} | {type(exc).__name__}: {str(exc)[:80]} | | |")
                print(rows[-1], flush=True)
                continue
            got = [o.detach().float()] + [x.grad.float() for x in leaves]
            if base is None:
                base = got
            diff = max(bl.rel(a, b) for a, b in zip(got, base))
            call = functools.partial(run, module, ir, n, leaves, p)
            with torch.no_grad():
                f = bl.bench(call, "fwd")
            fb = bl.bench(bl.fwd_bwd(call, leaves), "fwd+bwd")
            rows.append(f"| {name} | {n} | {f:.3f} | {fb:.3f} | {diff:.1e} |")
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"slices_{device.replace(' ', '_')}_{datetime.date.today()}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
