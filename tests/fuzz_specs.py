"""Seeded .miras spec generator and a case runner with a timeout, for tests/test_fuzz.py and
benchmarks/fuzz_specs.py.

The generator imports nothing from mirasc: it mutates the example specs token by token and draws
specs from the grammar, with names from a pool that holds Python keywords and builtins, every
identifier of the templates and of a generated module, long names and non-ASCII names.  A spec made
this way is meant to end in a layer that runs (and agrees with the reference backend) or in one
located error; anything else is a finding.

`run_case` (the only part that uses mirasc, imported inside the worker) classifies one spec:

    agree       check and compile accept it; the torch backend agrees with the reference backend (within
                the tolerance, or within 10x of how far the reference moves when v moves by 1e-13, for
                losses that amplify rounding, e.g. a division by sum(smooth_sign(y - v)))
    located     refused with one `file:line:col: error: ...` line (a SpecError)
    traceback   any other exception (its type and message are kept)
    disagree    check accepts it and compile refuses it
    nonfinite   accepted and run, but the reference backend's output is not finite at the drawn inputs
                (the loss is undefined there, e.g. sqrt(y - v)): not compared
    mismatch    the backends differ (or the module does not import, or memory() raises)
    hang        the case ran past the timeout
"""
from __future__ import annotations

import builtins
import keyword
import multiprocessing as mp
import random
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.miras"))
_TOKEN = re.compile(r"\s+|#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+|<=|>=|.", re.DOTALL)
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
NUMBERS = ("0", "1", "-1", "2", "3", "0.5", "0.99", "1e-6", "1e999", "1e-300", "65537", "4", "16", "64",
           "256", "257", "0.0", "-0.5", "1.5", ".5", "2.", "7")
SYMBOLS = ("(", ")", ",", "=", ":", "+", "-", "*", "/", "^", "<", "<=", "{", "}", "#", "\n")
FUNCTIONS1 = ("abs", "sqrt", "exp", "log", "tanh", "sigmoid", "softplus", "log1p", "cosh", "sin", "cos",
              "smooth_abs", "smooth_sign", "sign")
FUNCTIONS2 = ("min", "max")
REDUCTIONS = ("sum", "mean", "norm")


def name_pool(generated_source: str = "") -> list[str]:
    """Names to put where a spec has a name: reserved words, template and generated identifiers, odd ones."""
    names = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))
    for template in sorted((ROOT / "templates").glob("*.j2")):
        names |= set(_IDENT.findall(template.read_text(encoding="utf-8")))
    names |= set(_IDENT.findall(generated_source))
    names |= {"a" * 300, "x" * 5000, "é", "名前", "λ", "a\u200bb", "eta2", "alpha_", "_private", "__init__",
              "y", "v", "S1", "R1", "w", "V", "g", "dy", "dv", "loss"}
    return sorted(names)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def mutate(text: str, rng: random.Random, pool: list[str]) -> str:
    """1-3 token-level edits: insert, delete or replace a token, swap a number, rename a name."""
    toks = tokens(text)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(toks)) if toks else 0
        kind = rng.random()
        if kind < 0.2 and toks:
            del toks[i]
        elif kind < 0.4:
            toks.insert(i, rng.choice((rng.choice(pool), rng.choice(NUMBERS), rng.choice(SYMBOLS), " ")))
        elif kind < 0.6 and toks:
            toks[i] = rng.choice((rng.choice(SYMBOLS), rng.choice(NUMBERS), rng.choice(pool)))
        else:
            numbers = [j for j, t in enumerate(toks) if t[:1].isdigit()]
            names = [j for j, t in enumerate(toks) if t[:1].isalpha() or t[:1] == "_"]
            if numbers and rng.random() < 0.5:
                toks[rng.choice(numbers)] = rng.choice(NUMBERS)
            elif names:
                toks[rng.choice(names)] = rng.choice(pool)
    return "".join(toks)


def _expr(rng: random.Random, depth: int, inside: bool, scalars: list[str], channels: list[str]) -> str:
    """A bias expression: reductions at the top, elementwise terms in y, v and parameters inside."""
    if not inside:
        if depth <= 0 or rng.random() < 0.5:
            return f"{rng.choice(REDUCTIONS)}({_expr(rng, depth - 1, True, scalars, channels)})"
        op = rng.choice("+-*/")
        lhs = _expr(rng, depth - 1, False, scalars, channels)
        rhs = (_expr(rng, depth - 1, False, scalars, channels) if rng.random() < 0.7
               else rng.choice(["1", "2", "0.5"] + scalars))
        return f"({lhs} {op} {rhs})"
    leaves = ["y", "v", "(y - v)", "(y - v)", "1", "0.5", "2"] + scalars + channels
    if depth <= 0:
        return rng.choice(leaves)
    r = rng.random()
    if r < 0.3:
        return f"{rng.choice(FUNCTIONS1)}({_expr(rng, depth - 1, True, scalars, channels)})"
    if r < 0.4:
        a, b = (_expr(rng, depth - 1, True, scalars, channels) for _ in range(2))
        return f"{rng.choice(FUNCTIONS2)}({a}, {b})"
    if r < 0.75:
        a, b = (_expr(rng, depth - 1, True, scalars, channels) for _ in range(2))
        return f"({a} {rng.choice('+-*/')} {b})"
    if r < 0.85:
        return f"({_expr(rng, depth - 1, True, scalars, channels)})^{rng.choice(['2', '3', '0.5', '-1'])}"
    if r < 0.95:
        a, b, c, d = (_expr(rng, depth - 1, True, scalars, channels) for _ in range(4))
        return f"(if {a} {rng.choice(['<', '<=', '>', '>='])} {b} then {c} else {d})"
    return f"-{_expr(rng, depth - 1, True, scalars, channels)}"


def grammar_spec(rng: random.Random, pool: list[str]) -> str:
    """A spec drawn from the grammar, mostly valid: the four choices, gates and a bias."""
    def pick_name(default: str) -> str:
        return rng.choice(pool) if rng.random() < 0.1 else default

    lines = [f"layer {pick_name('Fuzz')} {{", f"    heads {rng.choice([1, 2, 4])}"]
    dim = rng.choice([4, 8, 16])
    lines += [f"    key_dim {dim}", f"    value_dim {dim if rng.random() < 0.9 else 2 * dim}"]
    mlp = rng.random() < 0.3
    act = rng.choice(["gelu", "silu", "tanh", "relu"])
    lines.append("    memory " + (f"mlp(depth={rng.randint(1, 3)}, expansion={rng.randint(1, 2)}, act={act})"
                                   if mlp else "linear"))
    eta, alpha = pick_name("eta"), pick_name("alpha")
    lines.append(f"    gate {eta} : head = softplus(rank=4, init={rng.choice(['0.1', '0.5', '1'])})")
    lines.append(f"    gate {alpha} : head = sigmoid(rank=4, init=0.9)")
    scalars, channels = [], []
    if rng.random() < 0.4:
        c = pick_name("c")
        lines.append(f"    const {c} = {rng.choice(['0.5', '2', '-1', '3'])}")
        scalars.append(c)
    if rng.random() < 0.3:
        p = pick_name("tau")
        lines.append(f"    param {p} = learnable({rng.choice(['0.5', '0.2'])}, sigmoid)")
        scalars.append(p)
    if rng.random() < 0.3 and not mlp:
        g = pick_name("beta")
        lines.append(f"    gate {g} : channel = sigmoid(rank=4, init=0.5)")
        channels.append(g)
    if rng.random() < 0.3:
        bias = rng.choice(["l2", "dot", "lp(p=3)", "l1", "huber(delta=1)", "huber_norm(1)", "huber_mix(1)",
                           "robust(Delta=0.5)"])
    else:
        bias = _expr(rng, rng.randint(1, 4), False, scalars, channels)
        if "y" not in bias:
            bias = f"sum((y - v)^2) + {bias}"
    lines.append(f"    bias {bias}")
    retentions = [f"decay({alpha})", f"decay({alpha})", "none", f"decay({alpha}) + lq(q=3)"]
    lines.append("    retention " + rng.choice(retentions))
    chunk = rng.choice([1, 2, 4, 8])
    if rng.random() < 0.3:
        lines.append(f"    algorithm momentum(beta=0.5, lr={eta}, chunk={chunk})")
    else:
        lines.append(f"    algorithm gd(lr={eta}, chunk={chunk})")
    text = "\n".join(lines) + "\n}\n"
    if "retention none" in text:  # alpha is then unused: use it nowhere, declare it nowhere
        text = text.replace(f"    gate {alpha} : head = sigmoid(rank=4, init=0.9)\n", "")
    return text


def draw_specs(n: int, seed: int, pool: list[str]) -> list[str]:
    """n specs: mutated examples and grammar draws, the same for the same seed."""
    rng = random.Random(seed)
    examples = [p.read_text(encoding="utf-8") for p in EXAMPLES]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            out.append(mutate(rng.choice(examples), rng, pool))
        elif r < 0.85:
            out.append(grammar_spec(rng, pool))
        else:
            out.append(mutate(grammar_spec(rng, pool), rng, pool))
    return out


# ---- running a case -------------------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str  # agree, located, nonfinite, traceback, disagree, mismatch, hang
    detail: str = ""


_LOCATED = re.compile(r"^.+:\d+:\d+: error: [^\n]+$")


def run_case(text: str, seed: int = 0) -> Outcome:
    """Check, compile, import and run one spec (in this process); see the module docstring."""
    import sys
    import tempfile

    import torch

    from mirasc.compiler import compile_spec
    from mirasc.frontend import load_spec
    from mirasc.frontend.errors import SpecError

    try:
        load_spec(text, "fuzz.miras")
    except SpecError as err:
        head = str(err).split("\n")[0]
        if not _LOCATED.match(head) or err.line < 1 or err.col < 1:
            return Outcome("traceback", f"unlocated SpecError: {head[:300]}")
        return Outcome("located", head[:300])
    except Exception as exc:  # noqa: BLE001 - a finding, kept with its traceback
        return Outcome("traceback", _tb(exc))
    try:
        compiled = compile_spec(text, "fuzz.miras")
    except Exception as exc:  # noqa: BLE001 - check accepted it: any refusal is a disagreement
        return Outcome("disagree", _tb(exc))
    from mirasc.testing import import_source, make_inputs, make_state

    with tempfile.TemporaryDirectory() as tmp:
        name = f"_mirasc_fuzz_{seed}"
        try:
            module = import_source(compiled.source, name, tmp)
            sys.modules.pop(name)  # one module per case: a long run keeps none of them
            ir = compiled.ir
            B, T, H, K, V = 1, 8, 1, 4, 4
            q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=seed)
            state = make_state(ir, B, H, K, V, gen=gen, scale=0.5)
            outs = {}
            for backend, vv in (("reference", v), ("torch", v), ("nudged", v * (1 + 1e-13))):
                o, s = module.memory(q, k, v=vv, **params, initial_state=state, output_final_state=True,
                                     chunk_size=ir.algorithm.chunk, backend="reference" if backend == "nudged"
                                     else backend)
                outs[backend] = [o] + ([s] if torch.is_tensor(s) else list(s))
        except Exception as exc:  # noqa: BLE001 - an accepted spec must run
            return Outcome("mismatch", _tb(exc))
    if not all(torch.isfinite(a).all() for a in outs["reference"]):
        # the loss is undefined at the drawn inputs (sqrt or log of a negative, a division by zero): where
        # the NaNs land depends on the order of operations, so there is nothing to compare
        bad = [i for i, a in enumerate(outs["reference"]) if not torch.isfinite(a).all()]
        return Outcome("nonfinite", f"non-finite reference outputs {bad}")
    for a, b, c in zip(outs["reference"], outs["torch"], outs["nudged"]):
        own = (c - a).abs().max().item()  # how far the reference itself moves when v moves by 1e-13
        if (b - a).abs().max().item() <= 10 * own:
            continue  # ill-conditioned at these inputs: the backends differ by less than rounding moves it
        try:
            # elementwise relative error, with an absolute floor at the tensor's scale: an element that
            # cancels to near zero in a tensor of size 1e6 carries that size's rounding error
            scale = max(1.0, a.abs().max().item())
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9 * scale)
        except AssertionError as exc:
            return Outcome("mismatch", " ".join(str(exc).split())[:300])
    return Outcome("agree")


def _tb(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]} (at {where})"


def _warm() -> None:
    """Import what run_case imports, so a worker's first case is timed like every other."""
    import torch  # noqa: F401

    import mirasc.codegen.emit
    import mirasc.compiler
    import mirasc.symbolic.derive
    import mirasc.testing  # noqa: F401
    from mirasc.frontend.parse import parser

    parser()


def _worker(conn) -> None:
    _warm()
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        text, seed = job
        conn.send(run_case(text, seed))


class Runner:
    """Runs cases one at a time in a forked worker; a case past `timeout` seconds is a hang (the worker
    is killed and a fresh one started)."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self.ctx = mp.get_context("fork")
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":  # the warm-up is not timed
            raise RuntimeError("the fuzz worker did not start")

    def run(self, text: str, seed: int) -> Outcome:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((text, seed))
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except EOFError:
                self.proc = None
                return Outcome("traceback", "the worker died")
        self.proc.kill()
        self.proc.join()
        self.proc = None
        return Outcome("hang", f"over {self.timeout:g} s")

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc = None
