"""MLP-memory layers on the GPU: agreement with the float32 torch backend at full shape, then speed.

    python benchmarks/bench_mlp.py [--budget SECONDS] [--jobs N] [--tune] [--smoke]

Layers: a 2-layer x4 MLP memory (Moneta's M(x) = x + LN(W1 GELU(W2 x)), per-head decay, gd, chunk 64)
with the lp(p=3), Huber and l2 biases; the Titans example (examples/titans.miras: SiLU MLP, l2, decay,
momentum), the Moneta example (examples/moneta.miras: lp(p=3), decay + lq(q=4) retention) and the Memora
example (examples/memora.miras: l2, decay + kl retention; the torch backend with the map read-out in
Triton, whose target is 1.5x the same MLP with decay alone, the "MLP l2" row); the
same three biases with a matrix memory; titans-pytorch's NeuralMemory when `import titans_pytorch` works.

Every layer runs in a child process of this script (`--one`), so a kernel that faults (an illegal
memory access poisons the CUDA context of its whole process) loses only its own rows. The children
print their table rows on stdout (lines starting with @@); this process collects them, streams
everything else with the child's name in front, and kills a child that overruns its time.

Part 1 (agreement, B=8, T=2048, H=16, K=V=64, bf16; --jobs children (default 4) side by side, the
heavy ones first; one that runs out of GPU memory there runs again alone; CUDA_LAUNCH_BLOCKING=1
and torch.cuda.synchronize() after every triton call, so a fault is reported at the call that made
it): the triton backend against the torch backend run in float32 on the same (bf16-rounded) inputs
(the torch backend equals the reference in CI; the token-by-token reference is too slow at this
shape): outputs, final state and the gradients of every input, relative error over all elements
< 1e-2, and no NaN; per-token decays in [0.999, 1) (DECAY says why), and the cond column gives the
torch backend's own float32 error (against float64, first sequence) and the sens column how far its
float32 gradients move when q, k, v move by bf16 rounding (a bf16 kernel cannot agree better). The Moneta example is checked at B=1: the torch backend's lq path keeps every
token's state (about 16 GB at B=1, too much at B=8); so is Memora (its torch backend keeps every token's
weights). The kernels multiply as the module's
_MLP_DOT_PRECISION says (tf32 for bf16 inputs); set to bf16 products there and missing the bar, the
check runs again with tf32 products. A launch setting that does not compile (or runs out of shared
memory / registers) is retried with the next of FALLBACK.
Part 2 (speed, one child at a time): median ms of triton.testing.do_bench, fwd and fwd+bwd, and the
memory one fwd+bwd allocates, for every layer above (triton), the lp(p=3) MLP on the torch backend,
and titans-pytorch. The Triton kernels compiled in part 1 come from Triton's on-disk cache.

Every figure is printed as soon as it is measured. No child starts and none runs past --budget seconds
(default 500: with start-up and the write-out, the script ends within 9 minutes); the layers that did
not fit are listed as skipped. The markdown table is written to $OUT/mlp.md when $OUT is set, and to
benchmarks/results/.
--tune also times a few kernel launch settings (TUNE_FWD / TUNE_BWD: tile width BX, warps, pipeline
stages, the keys of the module's _MLP_FWD_CONFIG / _MLP_BWD_CONFIG) on the lp(p=3) MLP and times the
MLP layers with the fastest.
--smoke runs everything at a tiny shape in Triton's CPU interpreter (checks the script, not speed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import bf16_nudged, import_spec, peak_mib, rel
from mirasc.testing import flatten_state, make_inputs, make_state

B, T, H, D, CHUNK = (1, 40, 2, 16, 16) if SMOKE else (8, 2048, 16, 64, 64)
DEV = "cpu" if SMOKE else "cuda"
MLP = "mlp(depth=2, expansion=4, act=gelu, residual=true, norm=true) init learned"
GATES = ["gate a : head = sigmoid(rank=4, init=0.97)", "gate eta : head = softplus(rank=4, init=0.1)"]
BIASES = {  # name: (bias, extra declarations)
    "lp(p=3)": ("lp(p=3)", []),
    "huber": ("huber(d)", ["gate d : head = softplus(rank=4, init=1.0)"]),
    "l2": ("l2", []),
}
EXAMPLES = {  # label: (example file, batch of the agreement check)
    "Titans example (momentum)": ("titans.miras", B),
    "Moneta example (lq retention)": ("moneta.miras", 1),
    "Memora example (kl retention, map read-out)": ("memora.miras", 1),
}
# Launch settings: the keys of the generated module's _MLP_FWD_CONFIG / _MLP_BWD_CONFIG. BX is the weight
# tile width (the backward's BXF with tf32 products); XS the hidden columns per program
# (split heads, depth-2 memories only; 0: one program per head).
TUNE_FWD = [{"BX": 64, "XS": 0, "num_warps": 8, "num_stages": 2}, {"BX": 64, "XS": 128, "num_warps": 4, "num_stages": 1},
            {"BX": 64, "XS": 64, "num_warps": 4, "num_stages": 1}, {"BX": 32, "XS": 128, "num_warps": 4, "num_stages": 1}]
TUNE_BWD = [{"BX": 64, "BXF": 32, "XS": 0, "num_warps": 8, "num_stages": 1},
            {"BX": 64, "BXF": 32, "XS": 128, "num_warps": 4, "num_stages": 1},
            {"BX": 64, "BXF": 64, "XS": 128, "num_warps": 4, "num_stages": 1},
            {"BX": 64, "BXF": 64, "XS": 64, "num_warps": 4, "num_stages": 1}]
FALLBACK = [  # (fwd, bwd) settings tried in turn after the module's own when a kernel does not compile
    ({"BX": 64, "XS": 0, "num_warps": 8, "num_stages": 2}, {"BX": 64, "XS": 0, "num_warps": 8, "num_stages": 1}),
    ({"BX": 16, "XS": 0, "num_warps": 4, "num_stages": 1}, {"BX": 64, "XS": 0, "num_warps": 4, "num_stages": 1}),
    ({"BX": 16, "XS": 0, "num_warps": 4, "num_stages": 1}, {"BX": 16, "XS": 0, "num_warps": 4, "num_stages": 1}),
]
CFG_ATTRS = ("_MLP_FWD_CONFIG", "_MLP_BWD_CONFIG")
# Per-token decays are drawn in [0.999, 1): with stronger decay (0.9 to 0.99 per token) a LayerNorm'd MLP
# memory is chaotic over 2048 tokens. The decay shrinks the weights, the LN's 1/std then magnifies the
# updates, and the torch backend in float32 and float64 end up 0.4 to 1.0 apart (relative) in the output.
# No kernel can agree with a reference there. The "cond" column measures this for every layer.
DECAY = (0.999, 1.0)
START = time.time()


def elapsed() -> float:
    return time.time() - START


def say(text: str) -> None:
    print(text, flush=True)


# ---- the layers --------------------------------------------------------------------------------------

def layer_names() -> list[str]:
    return [f"MLP {n}" for n in BIASES] + list(EXAMPLES) + [f"linear {n}" for n in BIASES]


def spec_text(name: str) -> tuple[str, str]:
    """(spec text, file name) of a layer of layer_names(), at this script's shape."""
    if name in EXAMPLES:
        file = EXAMPLES[name][0]
        text = (ROOT / "examples" / file).read_text()
        for word, value in (("heads", H), ("key_dim", D), ("value_dim", D)):
            text = re.sub(rf"^(\s*){word}\s+\d+", rf"\g<1>{word} {value}", text, flags=re.MULTILINE)
        return text, f"bench_mlp_{file}"
    kind, bias_name = name.split(" ", 1)
    bias, decls = BIASES[bias_name]
    i = list(BIASES).index(bias_name)
    memory = MLP if kind == "MLP" else "linear"
    text = "\n".join([f"layer Bench{kind}{i} {{", f"    heads {H}", f"    key_dim {D}", f"    value_dim {D}",
                      f"    memory {memory}", *("    " + d for d in GATES + decls), f"    bias {bias}",
                      "    retention decay(a)", f"    algorithm gd(lr=eta, chunk={CHUNK})", "}"])
    return text, f"bench_mlp_{kind.lower()}{i}.miras"


def compile_layer(name: str):
    """(module, ir); the module name depends on the layer only, so Triton's disk cache serves every child."""
    text, file = spec_text(name)
    return import_spec(text, file, Path(tempfile.mkdtemp()), "_bench_mlp_")


def gate_range(ir, p) -> tuple[float, float]:
    if p.kind == "learnable":
        return 0.5, 1.5
    if p.name == "d":  # the Huber threshold: from 0.5 to 2 the LayerNorm'd MLP layer is chaotic (cond 0.03-0.15)
        return 1.5, 3.5
    if p.name == ir.algorithm.beta:  # momentum
        return 0.5, 0.9
    if p.activation == "sigmoid":  # decays: see DECAY
        return DECAY
    return 0.005, 0.02  # learning rates: small enough that 64 summed gradients stay stable


def inputs(ir, seed=0, Bn=B):
    """bf16 q, k (unit norm), v; fp32 gates; an fp32 initial state (per weight matrix, then momenta)."""
    q, k, v, params, g = make_inputs(ir, Bn, T, H, D, D, dtype=torch.float32, seed=seed, device=DEV,
                                     ranges=lambda p: gate_range(ir, p))
    scale = 0.1 * D ** 0.5 if ir.memory.kind == "linear" else 1.0  # a matrix memory: S ~ 0.1 N(0, 1)
    weights = flatten_state(make_state(ir, Bn, H, D, D, dtype=torch.float32, gen=g, scale=scale, device=DEV))
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), params, weights



def run_memory(module, leaves, names, n_state, backend, weights=None):
    """memory() on leaves = [q, k, v, *params, *state]; with weights, one backward of sum(w * outputs)."""
    q, k, v = leaves[:3]
    params = dict(zip(names, leaves[3:3 + len(names)]))
    state = leaves[3 + len(names):]
    o, final = module.memory(q, k, v, **params, initial_state=state[0] if n_state == 1 else tuple(state),
                             output_final_state=True, chunk_size=CHUNK, backend=backend)
    outs = [o, *flatten_state(final)]
    if weights is not None:
        sum((x.float() * w).sum() for x, w in zip(outs, weights)).backward()
    return outs


# ---- one child: agreement ------------------------------------------------------------------------------

STAGE = ["start"]  # what the child was doing when an error came


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def agreement(module, ir, Bn) -> tuple[bool, list[str]]:
    """Triton (bf16 inputs) against the torch backend in float32 on the same values: (ok, cells)."""
    q, k, v, params, state = inputs(ir, seed=1, Bn=Bn)
    base = [q, k, v, *params.values(), *state]
    n_state = len(state)
    names = list(params)
    leaves = [x.detach().clone().requires_grad_() for x in base]
    g = torch.Generator(device=DEV).manual_seed(2)
    STAGE[0] = "triton fwd"
    outs = run_memory(module, [x.detach() for x in leaves], names, n_state, "triton")
    sync()
    weights = [torch.randn(x.shape, device=DEV, generator=g) for x in outs]
    STAGE[0] = "triton fwd+bwd"
    outs = run_memory(module, leaves, names, n_state, "triton", weights)
    sync()
    STAGE[0] = "torch fp32 fwd+bwd"
    ref_leaves = [x.detach().float().clone().requires_grad_() for x in base]
    ref_outs = run_memory(module, ref_leaves, names, n_state, "torch", weights)
    sync()
    STAGE[0] = "compare"
    errs = {"o": rel(outs[0], ref_outs[0]), "state": max(rel(a, b) for a, b in zip(outs[1:], ref_outs[1:]))}
    grad_names = ["q", "k", "v", *names, *[f"S0[{i}]" for i in range(n_state)]]
    grads = {n: rel(a.grad, b.grad) for n, a, b in zip(grad_names, leaves, ref_leaves)}
    finite = all(torch.isfinite(x).all().item() for x in (*outs, *(x.grad for x in leaves)))
    ok = finite and max([*errs.values(), *grads.values()]) < 1e-2
    worst = max(grads, key=grads.get)
    cond = conditioning(module, ir, base, names, n_state)
    # how far the torch backend's own gradients move under bf16 rounding of q, k, v (bf16_nudged)
    STAGE[0] = "bf16 sensitivity (torch fp32, noisy q, k, v)"
    noisy = bf16_nudged(base, g)
    run_memory(module, noisy, names, n_state, "torch", weights)
    sens = max(rel(a.grad, b.grad) for a, b in zip(noisy, ref_leaves))
    verdict = ("PASS" if ok else "FAIL (ill-conditioned: see cond)" if float(cond) >= 1e-3
               else "FAIL (bf16-sensitive: see sens)" if sens >= 1e-2 else "FAIL")
    return ok, [f"{errs['o']:.1e}", f"{errs['state']:.1e}", f"{grads[worst]:.1e} ({worst})",
                "yes" if finite else "NO", cond, f"{sens:.1e}", verdict]


def conditioning(module, ir, base, names, n_state) -> str:
    """How far the torch backend in float32 is from itself in float64 (output, first sequence): the
    error any float32 computation of this layer carries. Near 1 the problem is chaotic, not checkable."""
    STAGE[0] = "conditioning (torch fp32 vs fp64)"
    first = [x[:1] if x.dim() > 1 else x for x in base]  # gates of kind learnable have no batch dimension
    with torch.no_grad():
        lo = run_memory(module, [x.float() for x in first], names, n_state, "torch")[0]
        hi = run_memory(module, [x.double() for x in first], names, n_state, "torch")[0]
    return f"{rel(lo, hi):.1e}"


def compile_failure(exc: BaseException) -> bool:
    """A kernel that did not compile or does not fit: the CUDA context is intact, another setting may work."""
    if "CUDA error" in str(exc) or "AcceleratorError" in type(exc).__name__:
        return False
    return type(exc).__module__.startswith("triton") or "resource" in str(exc).lower() \
        or "shared memory" in str(exc)


def set_configs(module, cfgs) -> str:
    """Install launch settings {attr: dict}; returns a note for the table ('' when nothing changed)."""
    notes = []
    for attr, cfg in (cfgs or {}).items():
        current = getattr(module, attr, None)
        if not isinstance(current, dict):
            say(f"# {attr} not in the module: launch setting {cfg} ignored")
            continue
        if not set(cfg) <= set(current):
            say(f"# {attr} has keys {sorted(current)}; setting {cfg} ignored")
            continue
        if cfg != current:
            current.clear()
            current.update(cfg)
            notes.append(f"{attr.split('_')[2].lower()} {cfg}")
    return "; ".join(notes)


def with_fallback(name: str, module, fn, fallback: bool):
    """fn() under the module's launch settings, then (fallback) under each of FALLBACK while a kernel
    does not compile: (result, note naming the settings that ran)."""
    attempts = [None]
    if fallback and all(isinstance(getattr(module, a, None), dict) for a in CFG_ATTRS):
        attempts += [dict(zip(CFG_ATTRS, pair)) for pair in FALLBACK]
    note = ""
    for i, attempt in enumerate(attempts):
        if attempt is not None:
            note = set_configs(module, attempt)
            say("@@CFG " + json.dumps({a: getattr(module, a) for a in CFG_ATTRS}))
        try:
            return fn(), note
        except Exception as exc:
            if i + 1 == len(attempts) or not compile_failure(exc):
                raise
            last = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
            say(f"# {name}: {STAGE[0]}: {type(exc).__name__}: {last}")
            say(f"# {name}: retrying with {attempts[i + 1]}")
    raise AssertionError("unreachable")


def child_agree(name: str, cfgs) -> int:
    module, ir = compile_layer(name)
    Bn = EXAMPLES[name][1] if name in EXAMPLES else B
    label = name + (f", B={Bn}" if Bn != B else "")
    note = set_configs(module, cfgs)
    (ok, cells), fell_back = with_fallback(name, module, lambda: agreement(module, ir, Bn), cfgs is None)
    note = fell_back or note
    say(f"@@AGREE | {label}{', ' + note if note else ''} | " + " | ".join(cells) + " |")
    precision = getattr(module, "_MLP_DOT_PRECISION", None)  # None: a matrix-memory layer
    if not ok and precision is not None and precision.get(torch.bfloat16) != 3 and not SMOKE:
        module._MLP_DOT_PRECISION[torch.bfloat16] = 3  # tf32 products
        try:
            ok, cells = agreement(module, ir, Bn)
        except Exception as exc:
            if not compile_failure(exc):
                raise
            say(f"@@AGREE | {label}, tf32 products | {STAGE[0]}: {type(exc).__name__} (does not compile) "
                "| | | | | FAIL |")
            return 1
        say(f"@@AGREE | {label}, tf32 products | " + " | ".join(cells) + " |")
        if ok:
            say("@@TF32")
    return 0 if ok else 1


# ---- one child: speed --------------------------------------------------------------------------------

def timer(fn) -> float:
    if SMOKE:  # no CUDA events in the interpreter: one timed call
        fn()
        t0 = time.time()
        fn()
        return 1000 * (time.time() - t0)
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_layer(module, ir, backend):
    """(fwd ms, fwd+bwd ms, MiB of one fwd+bwd) of memory() with gradients for every input."""
    q, k, v, params, state = inputs(ir)
    leaves = [x.requires_grad_() for x in (q, k, v, *params.values(), *state)]
    names = list(params)

    def fwd():
        return run_memory(module, leaves, names, len(state), backend)[0]

    def both():
        for x in leaves:
            x.grad = None
        fwd().float().sum().backward()
    STAGE[0] = f"{backend} fwd"
    with torch.no_grad():
        f = timer(fwd)
    STAGE[0] = f"{backend} fwd+bwd"
    fb = timer(both)
    return f, fb, peak_mib(both, SMOKE)


def child_speed(name: str, cfgs, tf32: bool, backend: str) -> int:
    module, ir = compile_layer(name)
    note = set_configs(module, cfgs)
    label = f"{name}, {backend}" + (" (eager)" if backend == "torch" else "")
    if tf32:
        module._MLP_DOT_PRECISION[torch.bfloat16] = 3
        label += ", tf32 products"
    (f, fb, mem), fell_back = with_fallback(name, module, lambda: time_layer(module, ir, backend),
                                            cfgs is None and backend == "triton")
    note = fell_back or note
    say(f"@@SPEED | {label}{', ' + note if note else ''} | {f:.3f} | {fb:.3f} | {mem:.0f} |")
    return 0


def child_titans_pytorch() -> int:
    try:
        from titans_pytorch import NeuralMemory
    except Exception as exc:  # noqa: BLE001 - optional peer
        say(f"@@NOTE titans-pytorch not importable ({type(exc).__name__}: {exc}): skipped")
        return 0
    STAGE[0] = "titans-pytorch NeuralMemory()"
    mem = NeuralMemory(dim=H * D, chunk_size=CHUNK, heads=H, dim_head=D).to(DEV)
    seq = torch.randn(B, T, H * D, device=DEV, requires_grad=True)

    def fwd():
        return mem(seq)[0]

    def both():
        seq.grad = None
        mem.zero_grad(set_to_none=True)
        fwd().float().sum().backward()
    STAGE[0] = "titans-pytorch fwd"
    with torch.no_grad():
        f = timer(fwd)
    STAGE[0] = "titans-pytorch fwd+bwd"
    fb = timer(both)
    say(f"@@SPEED | titans-pytorch NeuralMemory (fp32, whole layer) | {f:.3f} | {fb:.3f} | {peak_mib(both, SMOKE):.0f} |")
    return 0


def child_main(args) -> int:
    torch.manual_seed(0)
    cfgs = json.loads(args.cfg) if args.cfg else None
    try:
        if args.one == "titans-pytorch":
            return child_titans_pytorch()
        if args.what == "agree":
            return child_agree(args.one, cfgs)
        return child_speed(args.one, cfgs, args.tf32, args.backend)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this child's row
        traceback.print_exc()
        msg = " ".join(str(exc).split())[:160].replace("|", "/")
        oom = "out of memory" in str(exc).lower()
        say(f"@@ERROR {'OOM ' if oom else ''}{STAGE[0]}: {type(exc).__name__}: {msg}")
        return 2


# ---- the parent: children, tables --------------------------------------------------------------------

class Child:
    """A child process of this script; its stdout streamed with a tag, its @@ lines collected."""

    def __init__(self, tag: str, argv: list[str], env: dict, cap: float):
        self.tag, self.cap, self.t0 = tag, cap, time.time()
        self.records: list[tuple[str, str]] = []
        self.tail: list[str] = []
        self.status = None
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, *(["--smoke"] if SMOKE else [])]
        say(f"[{elapsed():5.0f} s] start {tag} (limit {cap:.0f} s)")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=str(ROOT), bufsize=1, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("@@"):
                kind, _, rest = line[2:].partition(" ")
                self.records.append((kind, rest))
                if kind in ("AGREE", "SPEED"):
                    say(rest)
                else:
                    say(f"  [{self.tag}] {kind} {rest}")
            else:
                self.tail = (self.tail + [line])[-5:]
                say(f"  [{self.tag}] {line}")

    def poll(self, deadline: float) -> bool:
        """True once the child has ended (killing it when it overran its limit or the deadline)."""
        if self.status is None and self.proc.poll() is None:
            if time.time() - self.t0 <= self.cap and elapsed() <= deadline:
                return False
            self.proc.kill()  # this child only, by its own process handle
            self.proc.wait()
            self.status = f"killed after {time.time() - self.t0:.0f} s (time limit)"
        self.reader.join(timeout=5)
        if self.status is None:
            self.status = f"exit {self.proc.returncode}"
        say(f"[{elapsed():5.0f} s] end {self.tag}: {self.status}, {time.time() - self.t0:.0f} s")
        return True

    def get(self, kind: str) -> list[str]:
        return [rest for k, rest in self.records if k == kind]

    def error(self) -> str:
        """Why the child produced no row: its @@ERROR, else its time limit or its last line."""
        errs = self.get("ERROR")
        if errs:
            return errs[-1]
        if self.status and self.status.startswith("killed"):
            return self.status
        last = self.tail[-1] if self.tail else ""
        return f"{self.status}: {' '.join(last.split())[:160].replace('|', '/')}"


def run_children(jobs: list[tuple[str, list[str]]], parallel: int, cap: float, deadline: float,
                 env: dict) -> tuple[dict, list[str]]:
    """Run (tag, argv) jobs, `parallel` at a time, each within cap seconds and all within the deadline."""
    pending, running, done, skipped = list(jobs), [], {}, []
    while pending or running:
        while pending and len(running) < parallel:
            tag, argv = pending.pop(0)
            if deadline - elapsed() < 10:
                skipped.append(tag)
                say(f"[{elapsed():5.0f} s] skip {tag}: the {deadline:.0f} s budget is spent")
                continue
            running.append(Child(tag, argv, env, min(cap, deadline - elapsed())))
        for child in [c for c in running if c.poll(deadline)]:
            running.remove(child)
            done[child.tag] = child
        time.sleep(0.1)
    return done, skipped


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=500.0,
                    help="seconds: no child starts or runs past this (the script ends a few seconds later)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="agreement children run side by side (each holds up to ~25 GB of GPU memory)")
    ap.add_argument("--tune", action="store_true", help="time a few kernel launch settings first")
    ap.add_argument("--smoke", action="store_true", help="tiny shape in Triton's CPU interpreter")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: one layer (or titans-pytorch)
    ap.add_argument("--what", default="agree", choices=["agree", "speed"], help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)  # child: launch settings, JSON {attr: dict}
    ap.add_argument("--tf32", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="triton", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return child_main(args)

    device = "cpu (TRITON_INTERPRET=1)" if SMOKE else torch.cuda.get_device_name(0)
    head = (f"# MLP-memory layers: agreement and speed\n\n{datetime.date.today()} · {device} · "
            f"torch {torch.__version__} · triton {triton.__version__} · B={B}, T={T}, H={H}, K=V={D}, bf16, "
            f"chunk {CHUNK}; MLP memory {MLP.split(' init')[0]}, decay, gd (examples: as in examples/); "
            "the MLP kernels' products as the generated module's _MLP_DOT_PRECISION sets them\n")
    say(head)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    notes = []

    # Part 1: agreement, side by side (Triton compiles on the CPU; each child's kernels land in the cache)
    agree = ["## Agreement: triton (bf16 inputs) vs the torch backend in float32\n",
             "| layer | rel err o | rel err final state | worst grad rel err | finite | cond | sens | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    say("\n".join(agree))
    names = layer_names()
    agree_env = dict(env, CUDA_LAUNCH_BLOCKING="1")
    cap1 = min(300.0, 0.6 * args.budget)
    first = list(EXAMPLES)[::-1]  # the longest compiles (Moneta's lq kernels) start first
    order = first + [n for n in names if n not in first]
    done, _ = run_children([(f"agree {n}", ["--one", n, "--what", "agree"]) for n in order],
                           max(1, args.jobs), cap1, 0.6 * args.budget, agree_env)
    oom = [n for n in names if f"agree {n}" in done and done[f"agree {n}"].error().startswith("OOM")]
    if oom:  # ran out of GPU memory beside the others: once more, alone
        say(f"[{elapsed():5.0f} s] out of memory side by side: {', '.join(oom)}; once more, one at a time")
        again, _ = run_children([(f"agree {n}", ["--one", n, "--what", "agree"]) for n in oom], 1, cap1,
                                0.65 * args.budget, agree_env)
        done.update(again)
    all_ok = True
    cfgs, tf32 = {}, set()
    for n in names:
        child = done.get(f"agree {n}")
        rows = child.get("AGREE") if child else []
        if child is None:
            agree.append(f"| {n} | skipped (budget) | | | | | | |")
            all_ok = False
            continue
        if not rows:
            rows = [f"| {n} | error: {child.error()} | | | | | | FAIL |"]
        agree += rows
        all_ok &= child.proc.returncode == 0 and "PASS" in rows[-1]
        for c in child.get("CFG"):
            cfgs[n] = json.loads(c)
        if child.get("TF32"):
            tf32.add(n)
        if not child.get("AGREE"):
            say(agree[-1])

    # --tune: launch settings on the lp(p=3) MLP, one child per setting
    tuned = []
    mlp_cfg = None
    if args.tune:
        tuned = ["\n## Launch settings (MLP lp(p=3); fwd settings: fwd ms, bwd settings: fwd+bwd ms)\n",
                 "| setting | fwd | fwd+bwd |", "|---|---|---|"]
        say("\n".join(tuned))
        base = cfgs.get("MLP lp(p=3)", {})
        results = {}
        for kind, configs, attr in (("fwd", TUNE_FWD, "_MLP_FWD_CONFIG"), ("bwd", TUNE_BWD, "_MLP_BWD_CONFIG")):
            trial = []
            for cfg in configs:
                setting = {**base, **results, attr: cfg}
                tag = f"tune {kind} {cfg}"
                ran, _ = run_children([(tag, ["--one", "MLP lp(p=3)", "--what", "speed", "--cfg",
                                              json.dumps(setting)])], 1, 120.0, 0.75 * args.budget, env)
                rows = ran[tag].get("SPEED") if tag in ran else []
                if rows:
                    f, fb = (float(x) for x in rows[0].split("|")[2:4])
                    trial.append((f if kind == "fwd" else fb, cfg))
                    tuned.append(f"| {kind} {cfg} | {f:.3f} | {fb:.3f} |")
                elif tag in ran:
                    tuned.append(f"| {kind} {cfg} | failed: {ran[tag].error()} | |")
            if trial:
                results[attr] = min(trial, key=lambda r: r[0])[1]
        if results:
            mlp_cfg = results
            tuned.append(f"\nkept: {results}")
            say(tuned[-1])

    # Part 2: speed, one child at a time
    speed = ["\n## Speed (ms, median of do_bench) and memory (MiB allocated by one fwd+bwd beyond its inputs)\n",
             "| layer | fwd | fwd+bwd | peak MiB |", "|---|---|---|---|"]
    say("\n".join(speed))
    jobs = []
    order = [f"MLP {n}" for n in BIASES] + ["titans-pytorch"] + [f"linear {n}" for n in BIASES] + list(EXAMPLES)
    for n in order:
        if n == "titans-pytorch":
            jobs.append(("speed titans-pytorch", ["--one", "titans-pytorch"]))
            continue
        argv = ["--one", n, "--what", "speed"]
        cfg = {**cfgs.get(n, {}), **(mlp_cfg or {})} if n.startswith("MLP") else cfgs.get(n)
        if cfg:
            argv += ["--cfg", json.dumps(cfg)]
        if n in tf32:
            argv.append("--tf32")
        jobs.append((f"speed {n}", argv))
    jobs.append(("speed MLP lp(p=3), torch", ["--one", "MLP lp(p=3)", "--what", "speed", "--backend", "torch"]))
    done, _ = run_children(jobs, 1, 150.0, args.budget, env)
    for tag, _ in jobs:
        child = done.get(tag)
        if child is None:
            speed.append(f"| {tag[6:]} | skipped (budget) | | |")
            continue
        rows = child.get("SPEED")
        if rows:
            speed += rows
        elif child.get("NOTE"):
            notes += [f"- {x}" for x in child.get("NOTE")]
        else:
            speed.append(f"| {tag[6:]} | error: {child.error()} | | |")
            say(speed[-1])

    tail = ["\n## Notes\n", *notes] if notes else []
    text = "\n".join([head, *agree, *tuned, *speed, *tail]) + "\n"
    say("\n" + text)
    say(f"[{elapsed():5.0f} s] done")
    stem = "cpu_smoke" if SMOKE else device.replace(" ", "_")
    targets = [] if SMOKE else [ROOT / "benchmarks" / "results" / f"mlp_{stem}_{datetime.date.today()}.md"]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "mlp.md")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
