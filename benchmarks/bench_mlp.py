"""MLP-memory layers on the GPU: agreement with the float32 torch backend at full shape, then speed.

    python benchmarks/bench_mlp.py [--budget SECONDS] [--tune] [--smoke]

Layers: a 2-layer x4 MLP memory (Moneta's M(x) = x + LN(W1 GELU(W2 x)), per-head decay, gd, chunk 64)
with the lp(p=3), Huber and l2 biases, each beside the same spec with a matrix memory.
Part 1 (agreement, B=8, T=2048, H=16, K=V=64, bf16): the triton backend against the torch backend run
in float32 on the same (bf16-rounded) inputs (the torch backend equals the reference in CI; the token-
by-token reference is too slow at this shape): outputs, final state and the gradients of every input,
relative error over all elements < 1e-2, and no NaN. Where the bf16 tensor-core products miss the bar,
the same check runs again with tf32 products (the module's _MLP_DOT_PRECISION).
Part 2 (speed): median ms of triton.testing.do_bench, fwd and fwd+bwd, and the memory one fwd+bwd
allocates, for the MLP layers (triton and torch backends), the matrix-memory layers (triton), and
titans-pytorch's NeuralMemory when `import titans_pytorch` works.
Every figure is printed as soon as it is measured; each section is guarded, so one failure does not
lose the rest, and sections that would start after --budget seconds are skipped. The markdown table
is written to $OUT/mlp.md when $OUT is set, and to benchmarks/results/.
--tune also times a few kernel launch settings (tile width, warps) and keeps the fastest.
--smoke runs everything at a tiny shape in Triton's CPU interpreter (checks the script, not speed).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import os
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

from mirasc.compiler import compile_spec

B, T, H, D, CHUNK = (1, 40, 2, 16, 16) if SMOKE else (8, 2048, 16, 64, 64)
DEV = "cpu" if SMOKE else "cuda"
MLP = "mlp(depth=2, expansion=4, act=gelu, residual=true, norm=true) init learned"
GATES = ["gate a : head = sigmoid(rank=4, init=0.97)", "gate eta : head = softplus(rank=4, init=0.1)"]
BIASES = {  # name: (bias, extra declarations)
    "lp(p=3)": ("lp(p=3)", []),
    "huber": ("huber(d)", ["gate d : head = softplus(rank=4, init=1.0)"]),
    "l2": ("l2", []),
}
RANGES = {"a": (0.9, 0.99), "eta": (0.005, 0.02), "d": (0.5, 2.0)}  # per gate: decay, lr, Huber threshold
TUNE_FWD = [{"BX": 64, "num_warps": 8, "num_stages": 2}, {"BX": 32, "num_warps": 8, "num_stages": 2},
            {"BX": 64, "num_warps": 4, "num_stages": 2}, {"BX": 32, "num_warps": 16, "num_stages": 1}]
TUNE_BWD = [{"BX": 32, "num_warps": 8, "num_stages": 1}, {"BX": 16, "num_warps": 8, "num_stages": 1},
            {"BX": 32, "num_warps": 16, "num_stages": 1}, {"BX": 64, "num_warps": 16, "num_stages": 1}]
FALLBACK = [({"BX": 32, "num_warps": 8, "num_stages": 1}, {"BX": 16, "num_warps": 8, "num_stages": 1}),
            ({"BX": 16, "num_warps": 4, "num_stages": 1}, {"BX": 16, "num_warps": 4, "num_stages": 1})]
START = time.time()


def elapsed() -> float:
    return time.time() - START


def compile_layer(name: str, memory: str, bias: str, decls: list[str]):
    text = "\n".join([f"layer {name} {{", f"    heads {H}", f"    key_dim {D}", f"    value_dim {D}",
                      f"    memory {memory}", *("    " + d for d in GATES + decls), f"    bias {bias}",
                      "    retention decay(a)", f"    algorithm gd(lr=eta, chunk={CHUNK})", "}"])
    compiled = compile_spec(text, f"{name}.miras")
    path = Path(tempfile.mkdtemp()) / f"{name.lower()}.py"
    path.write_text(compiled.source)
    spec = importlib.util.spec_from_file_location(name.lower(), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, compiled.ir


def inputs(ir, seed=0):
    """bf16 q, k (unit norm), v; fp32 gates; an fp32 initial state W_0 (one matrix per layer)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, D, device=DEV, generator=g), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, device=DEV, generator=g), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device=DEV, generator=g).bfloat16()
    params = {}
    for p in ir.inputs():
        lo, hi = RANGES[p.name]
        params[p.name] = lo + (hi - lo) * torch.rand(B, T, H, device=DEV, generator=g)
    if ir.memory.kind == "linear":
        state = 0.1 * torch.randn(B, H, D, D, device=DEV, generator=g)
    else:
        dims = [D, ir.memory.expansion * D, D]
        state = tuple(torch.randn(B, H, a, b, device=DEV, generator=g) / a ** 0.5 for a, b in itertools.pairwise(dims))
    return q, k, v, params, state


def flat(state) -> list:
    return [state] if torch.is_tensor(state) else list(state)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_memory(module, leaves, names, n_state, backend, weights=None):
    """memory() on leaves = [q, k, v, *params, *state]; with weights, one backward of sum(w * outputs)."""
    q, k, v = leaves[:3]
    params = dict(zip(names, leaves[3:3 + len(names)]))
    state = leaves[3 + len(names):]
    o, final = module.memory(q, k, v, **params, initial_state=state[0] if n_state == 1 else tuple(state),
                             output_final_state=True, backend=backend)
    outs = [o, *flat(final)]
    if weights is not None:
        sum((x.float() * w).sum() for x, w in zip(outs, weights)).backward()
    return outs


def agreement(name, module, ir) -> tuple[bool, str]:
    """Triton (bf16 inputs) against the torch backend in float32 on the same values: (ok, table row)."""
    q, k, v, params, state = inputs(ir, seed=1)
    base = [q, k, v, *params.values(), *flat(state)]
    n_state = len(flat(state))
    leaves = [x.detach().clone().requires_grad_() for x in base]
    g = torch.Generator(device=DEV).manual_seed(2)
    outs = run_memory(module, [x.detach() for x in leaves], list(params), n_state, "triton")
    weights = [torch.randn(x.shape, device=DEV, generator=g) for x in outs]
    outs = run_memory(module, leaves, list(params), n_state, "triton", weights)
    ref_leaves = [x.detach().float().clone().requires_grad_() for x in base]
    ref_outs = run_memory(module, ref_leaves, list(params), n_state, "torch", weights)
    errs = {"o": rel(outs[0], ref_outs[0]), "state": max(rel(a, b) for a, b in zip(outs[1:], ref_outs[1:]))}
    grad_names = ["q", "k", "v", *params, *[f"W0[{i}]" for i in range(n_state)]]
    grads = {n: rel(a.grad, b.grad) for n, a, b in zip(grad_names, leaves, ref_leaves)}
    finite = all(torch.isfinite(x).all().item() for x in (*outs, *(x.grad for x in leaves)))
    worst = max([*errs.values(), *grads.values()])
    ok = finite and worst < 1e-2
    worst_grad = max(grads, key=grads.get)
    row = (f"| {name} | {errs['o']:.1e} | {errs['state']:.1e} | {grads[worst_grad]:.1e} ({worst_grad}) | "
           f"{'yes' if finite else 'NO'} | {'PASS' if ok else 'FAIL'} |")
    return ok, row


def timer(fn) -> float:
    if SMOKE:  # no CUDA events in the interpreter: one timed call
        fn()
        t0 = time.time()
        fn()
        return 1000 * (time.time() - t0)
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mib(fn) -> float:
    """Memory allocated by one call of fn beyond what was live before it (MiB)."""
    if SMOKE:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_layer(module, ir, backend="triton"):
    """(fwd ms, fwd+bwd ms, MiB of one fwd+bwd) of memory() with gradients for every input."""
    q, k, v, params, state = inputs(ir)
    leaves = [x.requires_grad_() for x in (q, k, v, *params.values(), *flat(state))]
    n = len(params)

    def fwd():
        return run_memory(module, leaves, list(params), len(leaves) - 3 - n, backend)[0]

    def both():
        for x in leaves:
            x.grad = None
        fwd().float().sum().backward()
    with torch.no_grad():
        f = timer(fwd)
    return f, timer(both), peak_mib(both)


def tune(module, ir) -> str:
    """Time the launch settings of TUNE_FWD / TUNE_BWD on this module; keep the fastest of each."""
    lines = []
    best = {}
    for kind, configs, attr in (("fwd", TUNE_FWD, "_MLP_FWD_CONFIG"), ("bwd", TUNE_BWD, "_MLP_BWD_CONFIG")):
        results = []
        for cfg in configs:
            setattr(module, attr, dict(cfg))
            try:
                f, fb, _ = time_layer(module, ir)
                ms = f if kind == "fwd" else fb
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile is skipped
                print(f"  {kind} {cfg}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            results.append((ms, cfg))
            lines.append(f"| {kind} {cfg} | {ms:.3f} |")
            print(lines[-1], flush=True)
        if results:
            best[attr] = min(results, key=lambda r: r[0])[1]
            setattr(module, attr, dict(best[attr]))
    return "\n".join(lines), best


def titans_pytorch_rows() -> list[str]:
    try:
        from titans_pytorch import NeuralMemory
    except Exception as exc:  # noqa: BLE001 - optional peer
        print(f"titans-pytorch not available ({type(exc).__name__}): skipped", flush=True)
        return []
    mem = NeuralMemory(dim=H * D, chunk_size=CHUNK, heads=H, dim_head=D).to(DEV)
    seq = torch.randn(B, T, H * D, device=DEV, requires_grad=True)

    def fwd():
        return mem(seq)[0]

    def both():
        seq.grad = None
        mem.zero_grad(set_to_none=True)
        fwd().float().sum().backward()
    with torch.no_grad():
        f = timer(fwd)
    row = f"| titans-pytorch NeuralMemory (fp32, whole layer) | {f:.3f} | {timer(both):.3f} | {peak_mib(both):.0f} |"
    print(row, flush=True)
    return [row]


def section(title: str, budget: float, fn):
    """Run fn() unless the budget is spent; print and swallow its exceptions."""
    if elapsed() > budget:
        print(f"[{title}: skipped, {elapsed():.0f} s spent of the {budget:.0f} s budget]", flush=True)
        return None
    try:
        return fn()
    except Exception:  # noqa: BLE001 - one failed section must not lose the others
        traceback.print_exc()
        print(f"[{title}: failed]", flush=True)
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=210.0, help="start no section after this many seconds")
    ap.add_argument("--tune", action="store_true", help="time a few kernel launch settings first")
    ap.add_argument("--smoke", action="store_true", help="tiny shape in Triton's CPU interpreter")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = "cpu (TRITON_INTERPRET=1)" if SMOKE else torch.cuda.get_device_properties(0).name
    head = (f"# MLP-memory layers: agreement and speed\n\n{datetime.date.today()} · {device} · "
            f"torch {torch.__version__} · triton {triton.__version__} · B={B}, T={T}, H={H}, K=V={D}, bf16, "
            f"chunk {CHUNK}; memory {MLP.split(' init')[0]}, decay, gd\n")
    print(head, flush=True)
    mlps, linears = {}, {}
    for i, (name, (bias, decls)) in enumerate(BIASES.items()):
        mlps[name] = compile_layer(f"Mlp{i}", MLP, bias, decls)
        linears[name] = compile_layer(f"Linear{i}", "linear", bias, decls)

    agree = ["## Agreement: triton (bf16 inputs) vs the torch backend in float32\n",
             "| layer | rel err o | rel err final state | worst grad rel err | finite | verdict |",
             "|---|---|---|---|---|---|"]
    print("\n".join(agree), flush=True)
    all_ok = True
    tf32 = set()  # layers timed with tf32 products because bf16 ones missed the bar

    def check(name, module, ir):
        nonlocal all_ok
        for attempt in range(len(FALLBACK) + 1):
            try:
                ok, row = agreement(f"MLP {name}", module, ir)
                break
            except Exception as exc:  # out of registers / shared memory: retry with smaller tiles
                if attempt == len(FALLBACK) or "resource" not in str(exc).lower():
                    raise
                module._MLP_FWD_CONFIG, module._MLP_BWD_CONFIG = (dict(c) for c in FALLBACK[attempt])
                print(f"  {type(exc).__name__}; retrying with {FALLBACK[attempt]}", flush=True)
        agree.append(row)
        print(row, flush=True)
        if not ok and not SMOKE:
            module._MLP_DOT_PRECISION[torch.bfloat16] = 3  # tf32 products
            ok, row = agreement(f"MLP {name}, tf32 products", module, ir)
            agree.append(row)
            print(row, flush=True)
            if ok:
                tf32.add(name)
            else:
                module._MLP_DOT_PRECISION[torch.bfloat16] = 1
        all_ok &= ok

    for name, (module, ir) in mlps.items():
        section(f"agreement {name}", args.budget, lambda n=name, m=module, i=ir: check(n, m, i))

    tuned = []
    if args.tune:
        module, ir = mlps["lp(p=3)"]
        tuned = ["\n## Launch settings (MLP lp(p=3), ms: fwd for fwd settings, fwd+bwd for bwd settings)\n",
                 "| setting | ms |", "|---|---|"]
        print("\n".join(tuned), flush=True)
        result = section("tune", args.budget, lambda: tune(module, ir))
        if result:
            tuned += [result[0], f"\nkept: {result[1]}"]
            for other, _ in mlps.values():
                for attr, cfg in result[1].items():
                    setattr(other, attr, dict(cfg))

    speed = ["\n## Speed (ms, median of do_bench) and memory (MiB allocated by one fwd+bwd beyond its inputs)\n",
             "| layer | fwd | fwd+bwd | peak MiB |", "|---|---|---|---|"]
    print("\n".join(speed), flush=True)

    def timed(label, module, ir, backend="triton"):
        f, fb, mem = time_layer(module, ir, backend)
        speed.append(f"| {label} | {f:.3f} | {fb:.3f} | {mem:.0f} |")
        print(speed[-1], flush=True)

    for name in BIASES:
        suffix = ", tf32 products" if name in tf32 else ""
        section(f"speed MLP {name}", args.budget, lambda n=name, s=suffix: timed(f"MLP {n}, triton{s}", *mlps[n]))
        section(f"speed linear {name}", args.budget, lambda n=name: timed(f"linear {n}, triton", *linears[n]))
    section("speed MLP torch", args.budget, lambda: timed("MLP lp(p=3), torch backend (eager)", *mlps["lp(p=3)"],
                                                          backend="torch"))
    rows = section("titans-pytorch", args.budget, titans_pytorch_rows)
    speed += rows or []

    text = "\n".join([head, *agree, *tuned, *speed]) + "\n"
    print("\n" + text, flush=True)
    targets = [ROOT / "benchmarks" / "results" / f"mlp_{device.split(' ')[0] if SMOKE else device.replace(' ', '_')}_"
               f"{datetime.date.today()}.md"]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "mlp.md")
    for path in targets[1:] if SMOKE else targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
