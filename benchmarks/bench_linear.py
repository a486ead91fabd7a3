"""Matrix-memory layers on the GPU: agreement with the reference at full shape, then speed beside peers.

    python benchmarks/bench_linear.py [--out DIR] [--quick] [--smoke] [--only REGEX]

Part 1 (agreement, B=8, T=2048, H=16, K=V=64, bf16): the triton backend's outputs and final state
against the reference backend run in float32 on the same (bf16-rounded) inputs, and its gradients of
every input against the torch backend in float32 (the torch backend equals the reference in CI); no NaN,
and the error is taken over every output element. A further column gives how far the torch backend's
own gradients move when q, k, v move by bf16 rounding (relative noise up to 2^-9): a layer whose gradients
move by more than 1e-2 there cannot be checked at 1e-2 with bf16 inputs, and its FAIL says so.
Part 2 (speed): median ms of triton.testing.do_bench for the generated layers and, in the same run, the
peers (fla, when its wheels are on PYTHONPATH; F.scaled_dot_product_attention).
Part 3: time against T (2K .. 64K) for the lp(p=3) layer.
Layers: the specs of LAYERS (the momentum and per-channel kernels beside the scalar-decay gd kernel of
the same bias and chunk; the retention maps) and the examples of EXAMPLES (per-channel decay:
log_cosh.miras; momentum: quantile.miras and momentum_deltanet.miras, whose state is the tuple (S, m)).
--only REGEX keeps the layers and peers whose names match (and skips the T sweep unless lp(p=3) is kept).
Prints a markdown table and writes it to benchmarks/results/ (or --out).
--smoke runs every part at a tiny shape in Triton's CPU interpreter, without the peers that need CUDA
(checks the script, not speed; writes a file only with --out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import bf16_nudged, import_spec, peak_mib, rel, stable_ranges
from mirasc.testing import flatten_state, make_inputs, make_state

B, T, H, D = (1, 40, 2, 16) if SMOKE else (8, 2048, 16, 64)
DEV = "cpu" if SMOKE else "cuda"

A_GATE = "gate a : head = sigmoid(rank=4, init=0.97)"
ETA_GATE = "gate eta : head = softplus(rank=4, init=0.1)"
LAYERS = {  # name: (bias, retention, algorithm, declarations)
    "dot + decay (chunk 64)": ("dot", "decay(a)", "gd(lr=1, chunk=64)", [A_GATE]),
    "l2 + decay, mini-batch (chunk 64)": ("l2", "decay(a)", "gd(lr=eta, chunk=64)", [A_GATE, ETA_GATE]),
    "l2 exact (delta rule, chunk 1)": ("l2", "none", "gd(lr=beta, chunk=1)", [
        "gate beta : head = sigmoid(rank=4, init=0.5)"]),
    "l2 exact + decay (gated delta rule, chunk 1)": ("l2", "decay(a)", "gd(lr=beta, chunk=1, at=retained)", [
        A_GATE, "gate beta : head = sigmoid(rank=4, init=0.5)"]),
    "lp(p=3) + decay (chunk 64)": ("lp(p=3)", "decay(a)", "gd(lr=eta, chunk=64)", [A_GATE, ETA_GATE]),
    "Cauchy (custom) + decay (chunk 64)": ("sum(log(1 + ((y - v) / c)^2))", "decay(a)", "gd(lr=eta, chunk=64)", [
        "param c = learnable(1.0, softplus)", A_GATE, ETA_GATE]),
    # the momentum and per-channel kernels beside the scalar-decay gd kernel of the same bias and chunk
    "lp(p=3) + decay, momentum (chunk 64)": ("lp(p=3)", "decay(a)", "momentum(beta=0.9, lr=eta, chunk=64)", [
        A_GATE, ETA_GATE]),
    "lp(p=3) + per-channel decay (chunk 64)": ("lp(p=3)", "decay(a)", "gd(lr=eta, chunk=64)", [
        "gate a : channel = sigmoid(rank=4, init=0.97)", ETA_GATE]),
    "quantile + decay, gd (chunk 16)": (
        "sum(if v - y >= 0 then 0.8 * smooth_abs(v - y) else 0.2 * smooth_abs(v - y))", "decay(a)",
        "gd(lr=eta, chunk=16)", [A_GATE, ETA_GATE]),
    # the retention maps (per-token kernels: every token reads map(Z_i))
    "lp(p=3) + decay + kl(key) (chunk 64)": ("lp(p=3)", "decay(a) + kl(axis=key)", "gd(lr=eta, chunk=64)", [
        A_GATE, ETA_GATE]),
    "lp(p=3) + decay + bregman (chunk 64)": ("lp(p=3)", "decay(a) + bregman", "gd(lr=eta, chunk=64)", [
        A_GATE, ETA_GATE]),
    "lp(p=3) + decay + elastic_net retain (chunk 64)": (
        "lp(p=3)", "decay(a) + elastic_net(gamma=0.001)", "gd(lr=eta, chunk=64)", [A_GATE, ETA_GATE]),
}
EXAMPLES = {  # name: example file, compiled as it is (heads and dims set to this script's shape)
    "log-cosh + per-channel decay (log_cosh.miras, chunk 64)": "log_cosh.miras",
    "quantile + momentum (quantile.miras, chunk 16)": "quantile.miras",
    "Momentum DeltaNet (momentum_deltanet.miras, chunk 1)": "momentum_deltanet.miras",
}


def smoke_chunk(chunk: int) -> int:
    """--smoke: chunks of at most 16, so that the tiny sequence spans several."""
    return min(chunk, 16) if SMOKE else chunk


def compile_layer(i: int, bias: str, retention: str, algorithm: str, decls: list[str]):
    algorithm = re.sub(r"chunk=(\d+)", lambda m: f"chunk={smoke_chunk(int(m.group(1)))}", algorithm)
    text = "\n".join([f"layer Bench{i} {{", f"    heads {H}", f"    key_dim {D}", f"    value_dim {D}",
                      "    memory linear", *("    " + d for d in decls), f"    bias {bias}",
                      f"    retention {retention}", f"    algorithm {algorithm}", "}"])
    return load_module(i, text)


def compile_example(i: int, file: str):
    text = (ROOT / "examples" / file).read_text()
    for word, value in (("heads", H), ("key_dim", D), ("value_dim", D)):
        text = re.sub(rf"^(\s*){word}\s+\d+", rf"\g<1>{word} {value}", text, flags=re.MULTILINE)
    text = re.sub(r"chunk=(\d+)", lambda m: f"chunk={smoke_chunk(int(m.group(1)))}", text)
    return load_module(i, text)


def load_module(i: int, text: str):
    return import_spec(text, f"bench{i}.miras", Path(tempfile.mkdtemp()), "_bench_linear_")


def inputs(ir, Tn=T, dtype=torch.bfloat16, seed=0, Bn=B):
    """q, k, v in dtype; fp32 gates in ranges stable over Tn tokens (`stable_ranges`)."""
    q, k, v, params, _ = make_inputs(ir, Bn, Tn, H, D, D, dtype=torch.float32, seed=seed, device=DEV,
                                     ranges=stable_ranges(ir))
    return q.to(dtype), k.to(dtype), v.to(dtype), params


def agreement(name, module, ir, rows):
    q, k, v, params = inputs(ir, seed=1)
    # S ~ 0.1 N(0, 1) (and for momentum the buffer m)
    s0 = flatten_state(make_state(ir, B, H, D, D, dtype=torch.float32, scale=0.1 * D ** 0.5, device=DEV,
                                  gen=torch.Generator(device=DEV).manual_seed(2)))
    ns = len(s0)

    def state(xs):
        return xs[0] if ns == 1 else tuple(xs)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, *params.values(), *s0)]
    if DEV == "cuda":
        torch.cuda.synchronize()
    o, s = module.memory(*leaves[:3], **dict(zip(params, leaves[3:-ns])), initial_state=state(leaves[-ns:]),
                         output_final_state=True, backend="triton")
    s = flatten_state(s)
    w_o, w_s = torch.randn_like(o, dtype=torch.float32), [torch.randn_like(x) for x in s]
    ((o.float() * w_o).sum() + sum((x * w).sum() for x, w in zip(s, w_s))).backward()
    with torch.no_grad():
        o_ref, s_ref = module.memory(q.float(), k.float(), v.float(), **params, initial_state=state(s0),
                                     output_final_state=True, backend="reference")
    ref_leaves = [x.detach().float().clone().requires_grad_() for x in (q, k, v, *params.values(), *s0)]
    o_t, s_t = module.memory(*ref_leaves[:3], **dict(zip(params, ref_leaves[3:-ns])),
                             initial_state=state(ref_leaves[-ns:]), output_final_state=True, backend="torch")
    ((o_t * w_o).sum() + sum((x * w).sum() for x, w in zip(flatten_state(s_t), w_s))).backward()
    errs = {"o": rel(o, o_ref), "state": max(rel(a, b) for a, b in zip(s, flatten_state(s_ref)))}
    for n, a, b in zip(["dq", "dk", "dv", *[f"d{p}" for p in params], "ds0", "dm0"], leaves, ref_leaves):
        errs[n] = rel(a.grad, b.grad)
    finite = all(torch.isfinite(x).all().item() for x in (o, *s, *(x.grad for x in leaves)))
    worst = max(errs.values())
    ok = finite and worst < 1e-2
    # how far the torch backend's own gradients move under bf16 rounding of q, k, v (bf16_nudged)
    noisy = bf16_nudged([q, k, v, *params.values(), *s0], torch.Generator(device=DEV).manual_seed(5))
    o_n, s_n = module.memory(*noisy[:3], **dict(zip(params, noisy[3:-ns])), initial_state=state(noisy[-ns:]),
                             output_final_state=True, backend="torch")
    ((o_n * w_o).sum() + sum((x * w).sum() for x, w in zip(flatten_state(s_n), w_s))).backward()
    sens = max(rel(a.grad, b.grad) for a, b in zip(noisy, ref_leaves))
    grads = {k_: v_ for k_, v_ in errs.items() if k_.startswith("d")}
    worst_grad = max(grads, key=grads.get)
    verdict = "PASS" if ok else "FAIL" if sens < 1e-2 else "FAIL (bf16-sensitive: see the column before)"
    rows.append(f"| {name} | {errs['o']:.1e} | {errs['state']:.1e} | {grads[worst_grad]:.1e} ({worst_grad}) "
                f"| {'yes' if finite else 'NO'} | {sens:.1e} | {verdict} |")
    print(rows[-1], flush=True)
    return ok


def bench(fn, what):
    try:
        if SMOKE:  # no CUDA events in the interpreter: one timed call after one warm-up
            fn()
            t0 = time.time()
            fn()
            return 1000 * (time.time() - t0)
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return ms
    except Exception as exc:  # noqa: BLE001 - a peer that refuses to run is reported, not fatal
        print(f"  {what}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return float("nan")


def fwd_bwd(run, leaves):
    def f():
        for x in leaves:
            x.grad = None
        out = run()
        out.float().sum().backward()
    return f


def time_layer(module, ir, Tn=T, backend="triton", Bn=B):
    q, k, v, params = inputs(ir, Tn, Bn=Bn)
    leaves = [x.requires_grad_() for x in (q, k, v, *params.values())]
    p = dict(zip(params, leaves[3:]))

    def run():
        return module.memory(*leaves[:3], **p, backend=backend)[0]

    with torch.no_grad():
        fwd = bench(run, "fwd")
    both = fwd_bwd(run, leaves)
    return fwd, bench(both, "fwd+bwd"), peak_mib(both, SMOKE)


def peers(pick=lambda name: True):
    out = {}
    q = F.normalize(torch.randn(B, T, H, D, device=DEV), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(B, T, H, D, device=DEV), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(B, T, H, D, device=DEV).bfloat16().requires_grad_()
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    with torch.no_grad():
        f = bench(sdpa, "sdpa")
    both = fwd_bwd(sdpa, [qt, kt, vt])
    out["causal softmax attention (SDPA)"] = (f, bench(both, "sdpa bwd"), peak_mib(both, SMOKE))
    if SMOKE:  # fla's kernels need CUDA
        return out
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.momentum_delta_rule import chunk_momentum_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
        from fla.ops.ttt import chunk_ttt_linear
    except Exception as exc:  # noqa: BLE001 - fla is optional
        print(f"fla not available: {exc}", flush=True)
        return out
    # fla refuses its gated backward on Hopper with Triton 3.4-3.7.0 (it reports wrong results there);
    # the guard is lifted for timing only.
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    g = torch.log(0.9 + 0.09 * torch.rand(B, T, H, device=DEV)).requires_grad_()
    beta = torch.rand(B, T, H, device=DEV).bfloat16().requires_grad_()
    eta = (0.05 + 0.1 * torch.rand(B, T, H, 1, device=DEV)).bfloat16().requires_grad_()
    w = torch.ones(H, D, device=DEV).bfloat16().requires_grad_()
    bb = torch.zeros(H, D, device=DEV).bfloat16().requires_grad_()
    mu = torch.log(0.5 + 0.45 * torch.rand(B, T, H, device=DEV)).requires_grad_()
    ones = torch.ones(B, T, H, device=DEV)
    cases = {
        "fla chunk_simple_gla": (lambda: chunk_simple_gla(q, k, v, g=g)[0], [q, k, v, g]),
        "fla chunk_delta_rule": (lambda: chunk_delta_rule(q, k, v, beta=beta)[0], [q, k, v, beta]),
        "fla chunk_gated_delta_rule": (lambda: chunk_gated_delta_rule(q, k, v, g=g, beta=beta)[0],
                                       [q, k, v, g, beta]),
        "fla chunk_ttt_linear (chunk 16)": (lambda: chunk_ttt_linear(q, k, v, w, bb, eta, chunk_size=16)[0],
                                            [q, k, v, eta, w, bb]),
        # Momentum DeltaNet (examples/momentum_deltanet.miras's rule): fla 0.6.0 runs it in PyTorch
        "fla chunk_momentum_delta_rule (PyTorch in fla 0.6.0)": (
            lambda: chunk_momentum_delta_rule(q, k, v, g, mu, beta=ones, eta=beta, scale=1.0,
                                              use_qk_l2norm_in_kernel=False)[0], [q, k, v, g, mu, beta]),
    }
    for name, (fn, leaves) in cases.items():
        if not pick(name):
            continue
        with torch.no_grad():
            f = bench(fn, name)
        both = fwd_bwd(fn, leaves)
        out[name] = (f, bench(both, name + " bwd"), peak_mib(both, SMOKE))
        print(f"| {name} | {out[name][0]:.3f} | {out[name][1]:.3f} | {out[name][2]:.0f} |", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="directory of the table (default benchmarks/results/; "
                                                "with --smoke, none)")
    ap.add_argument("--quick", action="store_true", help="skip the T sweep")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter, no CUDA peers")
    ap.add_argument("--only", default=None, help="a regular expression: only the layers and peers whose name "
                                                 "matches (the file name gets _only)")
    args = ap.parse_args()
    pick = (lambda name: re.search(args.only, name) is not None) if args.only else (lambda name: True)
    torch.manual_seed(0)
    device = "cpu (TRITON_INTERPRET=1)" if SMOKE else torch.cuda.get_device_properties(0).name
    head = (f"# Matrix-memory layers: agreement and speed\n\n{datetime.date.today()} · {device} · "
            f"torch {torch.__version__} · triton {triton.__version__} · B={B}, T={T}, H={H}, K=V={D}, bf16\n")
    print(head, flush=True)
    modules = {name: compile_layer(i, *spec) for i, (name, spec) in enumerate(LAYERS.items()) if pick(name)}
    for i, (name, file) in enumerate(EXAMPLES.items(), start=len(LAYERS)):
        if pick(name):
            modules[name] = compile_example(i, file)

    agree = ["## Agreement (triton, bf16) vs reference fp32 (o, state) and torch fp32 (grads)\n",
             ("| layer | rel err o | rel err state | max rel err grads | finite | grads moved by bf16-sized "
              "noise in q, k, v (torch fp32) | verdict |"), "|---|---|---|---|---|---|---|"]
    print("\n".join(agree), flush=True)
    all_ok = True
    for name, (module, ir) in modules.items():
        try:
            all_ok &= agreement(name, module, ir, agree)
        except Exception:  # noqa: BLE001 - report the layer as failed and go on
            traceback.print_exc()
            all_ok = False
            agree.append(f"| {name} | error | | | | | FAIL |")

    speed = ["\n## Speed (ms, median) and memory (MiB allocated by one fwd+bwd beyond its inputs)\n",
             "| layer | fwd | fwd+bwd | peak MiB |", "|---|---|---|---|"]
    print("\n".join(speed), flush=True)
    for name, (module, ir) in modules.items():
        f, fb, mem = time_layer(module, ir)
        speed.append(f"| mirasc {name} | {f:.3f} | {fb:.3f} | {mem:.0f} |")
        print(speed[-1], flush=True)
    lp3 = modules.get("lp(p=3) + decay (chunk 64)")
    if lp3 is not None:
        f, fb, mem = time_layer(*lp3, backend="torch")
        speed.append(f"| mirasc lp(p=3) + decay, torch backend (eager PyTorch) | {f:.3f} | {fb:.3f} | {mem:.0f} |")
        print(speed[-1], flush=True)
    for name, (module, ir) in modules.items():  # one decode step (torch ops; no fused step kernel yet)
        q, k, v, params = inputs(ir, 1)
        tok = {n: (p if p.dim() == 1 else p[:, 0]) for n, p in params.items()}
        zeros = torch.zeros(B, H, D, D, device=DEV)
        state = module.decode_state((zeros, zeros.clone()) if ir.algorithm.kind == "momentum" else zeros)
        with torch.no_grad():
            tok_qkv = (q[:, 0], k[:, 0], v[:, 0])
            ms = bench(lambda m=module, a=tok_qkv, s=state, t=tok: m.step(*a, **t, state=s), "step")
        speed.append(f"| mirasc {name}: one decode step (B={B}, H={H}) | {ms:.4f} | | |")
        print(speed[-1], flush=True)
    for name, (f, fb, mem) in peers(pick).items():
        speed.append(f"| {name} | {f:.3f} | {fb:.3f} | {mem:.0f} |")

    sweep = []
    if not args.quick and lp3 is not None:
        module, ir = lp3
        sweep = [f"\n## lp(p=3) + decay: time against T (B=1, H={H})\n", "| T | fwd ms | fwd+bwd ms | fwd+bwd us / 1K tokens |",
                 "|---|---|---|---|"]
        print("\n".join(sweep), flush=True)
        for Tn in (32, 64) if SMOKE else (2048, 8192, 32768, 65536):
            f, fb, _ = time_layer(module, ir, Tn, Bn=1)
            sweep.append(f"| {Tn} | {f:.3f} | {fb:.3f} | {1000 * fb / (Tn / 1024):.1f} |")
            print(sweep[-1], flush=True)

    text = "\n".join([head, *agree, *speed, *sweep]) + "\n"
    print("\n" + text)
    if args.out or not SMOKE:
        out = Path(args.out or ROOT / "benchmarks" / "results")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"linear_{device.split(' ')[0] if SMOKE else device.replace(' ', '_')}_{datetime.date.today()}"
         f"{'_only' if args.only else ''}.md"
         ).write_text(text)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
