"""Packed variable-length batches (cu_seqlens) on the GPU: one launch against one call per sequence.

    python benchmarks/bench_varlen.py            # writes $OUT/varlen.md when $OUT is set
    python benchmarks/bench_varlen.py --smoke    # tiny shapes in Triton's CPU interpreter

Layers: Gated DeltaNet (examples/gated_deltanet.miras, chunk 1: the WY form), the lp(p=3) + decay
layer (chunk 64) and the same layer with bench_mlp.py's 2-layer x4 MLP memory (decays in [0.999, 1), as
there), H=16, K=V=64, bf16. N sequences of random lengths (fixed seed) packed into 16K tokens.
Agreement: the packed call's outputs, final states and the gradients of q, k, v, the gates and the
initial states against one triton call per sequence (relative error < 1e-2; the two differ only in
which program runs a sequence, so they should agree to rounding). Speed: median ms of
triton.testing.do_bench, forward and forward + backward, packed against the loop over sequences, and
against a padded batch [N, max length] that wastes the padding's work.
"""
from __future__ import annotations

import os
import sys
import tempfile
from itertools import pairwise
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec, lp_decay_spec, median_ms, rel
from mirasc.testing import cu_seqlens, draw_lengths, flatten_state, make_inputs, make_state

H, D = (2, 16) if SMOKE else (16, 64)
TOTAL, COUNTS = (80, (3,)) if SMOKE else (16384, (4, 16, 64))
DEV = "cpu" if SMOKE else "cuda"
MLP = "mlp(depth=2, expansion=4, act=gelu, residual=true, norm=true) init learned"  # as in bench_mlp.py


def inputs(ir, lens: list[int], seed: int = 0):
    """[q, k, v, gates..., initial state tensors...] (one state per sequence), the gates' names."""
    mlp = ir.memory.kind == "mlp"
    ranges = {"alpha": (0.95, 1.0), "a": (0.999 if mlp else 0.95, 1.0), "beta": (0.1, 0.9)}
    q, k, v, params, g = make_inputs(ir, 1, sum(lens), H, D, D, dtype=torch.float32, seed=seed, device=DEV,
                                     ranges=lambda p: ranges.get(p.name, (0.01, 0.1)))
    # one state per sequence; the first weight matrix ~ 0.1 N(0, 1)
    s0 = flatten_state(make_state(ir, len(lens), H, D, D, dtype=torch.float32, gen=g, scale=0.1 * D ** 0.5,
                                  device=DEV))
    return [q.bfloat16(), k.bfloat16(), v.bfloat16(), *params.values(), *s0], list(params)


def state_of(leaves, names):
    """The initial state among the leaves: one tensor (matrix memory) or a tuple (MLP memory)."""
    s0 = leaves[3 + len(names):]
    return s0[0] if len(s0) == 1 else tuple(s0)


def joined(finals):
    """Final states of several calls joined on the batch dim (tensors or tuples of tensors)."""
    if isinstance(finals[0], torch.Tensor):
        return torch.cat(finals, 0)
    return tuple(torch.cat(xs, 0) for xs in zip(*finals))


def packed(module, leaves, names, cu, chunk):
    q, k, v = leaves[:3]
    return module.memory(q, k, v, **dict(zip(names, leaves[3:3 + len(names)])),
                         initial_state=state_of(leaves, names), output_final_state=True, chunk_size=chunk,
                         backend="triton", cu_seqlens=cu)


def looped(module, leaves, names, bounds, chunk):
    """One triton call per sequence, outputs and states joined as the packed call returns them."""
    outs, finals = [], []
    s0 = flatten_state(state_of(leaves, names))
    for n, (a, b) in enumerate(pairwise(bounds)):
        params = {p: (x if x.dim() == 1 else x[:, a:b]) for p, x in zip(names, leaves[3:3 + len(names)])}
        s0_n = [x[n:n + 1] for x in s0]
        o, f = module.memory(*(x[:, a:b] for x in leaves[:3]), **params,
                             initial_state=s0_n[0] if len(s0_n) == 1 else tuple(s0_n),
                             output_final_state=True, chunk_size=chunk, backend="triton")
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, 1), joined(finals)


def padded(module, leaves, names, bounds, chunk):
    """The sequences padded to the longest one in a [N, max length] batch (the work a batch without
    cu_seqlens does); only timed."""
    lens = [b - a for a, b in pairwise(bounds)]
    Tm = max(lens)

    def pad(x, value=0.0):
        rows = [F.pad(x[0, a:b], (0, 0) * (x.dim() - 2) + (0, Tm - (b - a)), value=value)
                for a, b in pairwise(bounds)]
        return torch.stack(rows)

    # gates padded with 1 (a decay of exactly 0 is not a valid input of the triton backend)
    params = {p: (x if x.dim() == 1 else pad(x, 1.0)) for p, x in zip(names, leaves[3:3 + len(names)])}
    return module.memory(*(pad(x) for x in leaves[:3]), **params, initial_state=state_of(leaves, names),
                         output_final_state=True, chunk_size=chunk, backend="triton")


def fwd_bwd(fn, leaves):
    def run():
        for x in leaves:
            x.grad = None
        o, f = fn(leaves)
        (o.float().square().sum() + sum(x.square().sum() for x in flatten_state(f))).backward()
    return run


def row(module, ir, label: str, chunk: int, N: int) -> str:
    """Agreement and times of one layer at N packed sequences: a table row."""
    lens = draw_lengths(TOTAL, N, seed=N)
    cu = cu_seqlens(lens, dtype=torch.int32, device=DEV)
    bounds = cu.tolist()
    base, names = inputs(ir, lens)
    runs = (lambda xs: packed(module, xs, names, cu, chunk), lambda xs: looped(module, xs, names, bounds, chunk),
            lambda xs: padded(module, xs, names, bounds, chunk))
    a = [x.detach().clone().requires_grad_() for x in base]
    b = [x.detach().clone().requires_grad_() for x in base]
    fwd_bwd(runs[0], a)()
    fwd_bwd(runs[1], b)()
    (oa, fa), (ob, fb) = runs[0](a), runs[1](b)
    worst = max([rel(oa, ob)] + [rel(x, y) for x, y in zip(flatten_state(fa), flatten_state(fb))]
                + [rel(x.grad, y.grad) for x, y in zip(a, b)])
    nograd = [x.detach() for x in base]
    times = []
    for fn in runs:
        times.append(median_ms(lambda f=fn: f(nograd), SMOKE))
        times.append(median_ms(fwd_bwd(fn, a), SMOKE))
    verdict = "" if worst < 1e-2 else " FAIL"
    return (f"| {label} | {N} | {min(lens)}-{max(lens)} | {worst:.1e}{verdict} | "
            + " | ".join(f"{t:.3f}" for t in times) + " |")


def main() -> None:
    device = "cpu (TRITON_INTERPRET=1)" if SMOKE else torch.cuda.get_device_name(0)
    rows = [(f"# Packed sequences (cu_seqlens): {TOTAL} tokens, H={H}, K=V={D}, bf16; {device}, torch "
             f"{torch.__version__}, triton {triton.__version__}\n"),
            ("| layer | N | lengths (min-max) | worst rel err packed vs loop | packed fwd | packed fwd+bwd "
             "| loop fwd | loop fwd+bwd | padded fwd | padded fwd+bwd |"), "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    out = Path(tempfile.mkdtemp())
    layers = [("Gated DeltaNet (chunk 1)", (ROOT / "examples" / "gated_deltanet.miras").read_text(), 1),
              ("lp(p=3) + decay (chunk 64)", lp_decay_spec(H, D), 64),
              ("MLP lp(p=3) + decay (chunk 64)", lp_decay_spec(H, D).replace("memory linear", f"memory {MLP}"), 64)]
    for label, text, chunk in layers:
        text = text.replace("heads 16", f"heads {H}").replace("key_dim 64", f"key_dim {D}")
        text = text.replace("value_dim 64", f"value_dim {D}")
        tag = f"{chunk}{'_mlp' if 'MLP' in label else ''}"
        module, ir = import_spec(text, f"varlen_{tag}.miras", out, f"_varlen_{tag}_")
        for N in COUNTS:
            rows.append(row(module, ir, label, chunk, N))
            print(rows[-1], flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "varlen.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
