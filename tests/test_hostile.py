"""Hostile input to the front half: deep and long expressions, bad bytes, unwritable places, a stale or
damaged cache, and a file name that tries to inject code.  Each case must end in one located error line
(or a plain `mirasc: ...` line) quickly, never a traceback, and never in stale or injected code."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirasc import compiler
from mirasc.cli import main
from mirasc.compiler import compile_spec, load_source
from mirasc.frontend import load_spec
from mirasc.frontend.errors import SpecError
from mirasc.frontend.parse import MAX_DEPTH, MAX_PARENS, MAX_TOKENS

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
layer Hostile {
    heads 1
    key_dim 4
    value_dim 4
    memory linear
    gate eta : head = softplus(rank=4, init=0.5)
    gate alpha : head = sigmoid(rank=4, init=0.9)
    bias l2
    retention decay(alpha)
    algorithm gd(lr=eta, chunk=2)
}
"""


def with_bias(expr: str) -> str:
    return BASE.replace("bias l2", f"bias {expr}")


def nested(fn: str, depth: int, inner: str = "y - v") -> str:
    return f"{fn}(" * depth + inner + ")" * depth


def refused(text: str, file: str = "h.miras") -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(text, file)
    return info.value


# ---- item 1: derivation time, nesting limits -------------------------------------------------------


@pytest.mark.parametrize("fn", ["tanh", "exp"])
def test_nested_functions_derive_in_polynomial_time(fn):
    """Depth 10 took 281 s (tanh) and 371 s then an OverflowError (exp)."""
    start = time.perf_counter()
    compiled = compile_spec(with_bias(f"sum({nested(fn, 10)})"), "nest.miras")
    assert time.perf_counter() - start < 20
    assert compiled.ir.bias.klass == "nonlinear"


def test_nesting_limit_is_depth_not_length():
    at_limit = with_bias(f"sum({nested('abs', MAX_DEPTH - 1, 'y')})")  # sum is the first level
    assert load_spec(at_limit)
    err = refused(with_bias(f"sum({nested('abs', MAX_DEPTH, 'y')})"))
    assert "nested too deeply" in err.message and (err.line, err.col) == (8, 14 + 4 * MAX_DEPTH)  # the innermost y
    chain = "sum(y*v)" + " + 1" * 150 + " - sum(y) * 2 / 3" * 20
    compiled = compile_spec(with_bias(chain), "chain.miras")  # a long flat chain is one level
    assert compiled.ir.bias.klass == "independent"


@pytest.mark.parametrize("body", [
    "(" * 100_000 + "y" + ")" * 100_000,
    nested("abs", 100_000, "y"),
    "-" * 100_000 + "y",
    "y^" * 100_000 + "2",
    " + ".join(["y"] * 100_000),
], ids=["nested_parens", "nested_abs", "unary_minus_chain", "power_chain", "long_sum"])
def test_absurd_input_is_refused_fast(body):
    """100,000 levels took 7.5 s to refuse; now a linear scan refuses it before the parser runs."""
    start = time.perf_counter()
    err = refused(with_bias(f"sum({body})"))
    assert time.perf_counter() - start < 1.0
    assert err.line == 8 and err.col > 1
    assert "nested too deeply" in err.message or f"more than {MAX_TOKENS} tokens" in err.message
    assert len(str(err).split("\n")) == 3


def test_parentheses_limit():
    assert load_spec(with_bias("sum(" + "(" * (MAX_PARENS - 1) + "y" + ")" * (MAX_PARENS - 1) + ")"))
    err = refused(with_bias("sum(" + "(" * MAX_PARENS + "y" + ")" * MAX_PARENS + ")"))
    assert "parentheses" in err.message and err.col == 13 + MAX_PARENS  # sum( is the first


def test_nested_reduction_refused_by_check_with_place():
    """mean(sum(y) * v) passed check and died in compile with DeriveError."""
    err = refused(with_bias("mean(sum(y) * v)"))
    assert "do not nest" in err.message and (err.line, err.col) == (8, 15)


def test_bias_that_cancels_y_refused_by_check():
    err = refused(with_bias("sum(y - y) + sum(v^2)"))
    assert "does not depend on y" in err.message and err.line == 8


# ---- item 2: messages, not tracebacks ----------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirasc", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, timeout=120, env={**os.environ, **(env or {})})


def one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    head = stderr.strip().split("\n")[0]
    assert head.startswith("mirasc: ") or ": error: " in head, stderr
    return head


@pytest.mark.parametrize("data", [
    b"layer X {\n    bias \xff\xfe\n}\n",
    bytes(range(256)) * 4,
    b"\x00\x01\x02layer",
    bytes((i * 7919 + 13) % 256 for i in range(5000)),
], ids=["bias_not_utf8", "all_bytes", "nul_prefix", "scrambled"])
def test_bad_bytes_are_one_located_line(tmp_path, capsys, data):
    spec = tmp_path / "bad.miras"
    spec.write_bytes(data)
    for command in ("check", "compile", "explain"):
        extra = ["-o", str(tmp_path / "out")] if command == "compile" else []
        assert main([command, str(spec), *extra]) == 1
        head = one_error(capsys.readouterr().err)
        assert head.startswith(f"{spec}:")
    r = run_cli("check", str(spec))
    assert r.returncode == 1
    assert one_error(r.stderr).startswith(f"{spec}:")


def test_output_that_cannot_be_written(tmp_path, capsys):
    spec = tmp_path / "ok.miras"
    spec.write_text(BASE)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in (a_file, a_file / "below"):
        assert main(["compile", str(spec), "-o", str(out)]) == 1
        head = one_error(capsys.readouterr().err)
        assert head.startswith("mirasc: cannot write")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["compile", str(spec), "-o", str(ro)]) == 1
        assert one_error(capsys.readouterr().err).startswith("mirasc: cannot write")
    r = run_cli("compile", str(spec), "-o", str(a_file))
    assert r.returncode == 1 and one_error(r.stderr).startswith("mirasc: cannot write")


def test_long_line_is_clipped_around_the_caret(tmp_path, capsys):
    spec = tmp_path / "long.miras"
    spec.write_text(with_bias("sum((y - v)^2)" + " + 1.000000" * 3000 + " + $"))  # a 33,000-character line
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 3 and all(len(line) < 300 for line in lines), [len(x) for x in lines]
    assert "unexpected character '$'" in lines[0]
    assert lines[2].index("^") == lines[1].index("$")


def test_unwritable_cache_falls_back(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MIRASC_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(compiler, "_fallback_cache_dir", lambda: tmp_path / "fallback")
    with pytest.warns(RuntimeWarning, match="cannot write the cache"):
        module = load_source(BASE.replace("Hostile", "HostileCache"), "hostile_cache.miras")
    assert Path(module.__file__).parent == tmp_path / "fallback"
    monkeypatch.setenv("HOME", str(blocker))
    monkeypatch.delenv("MIRASC_CACHE")
    code = ("import warnings, mirasc; warnings.simplefilter('ignore');"
            f"m = mirasc.load_source({BASE.replace('Hostile', 'HostileHome')!r}, 'home.miras'); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "HOME": str(blocker)}, check=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---- item 3: the cache ----------------------------------------------------------------------------------


def test_cache_key_covers_the_toolchain(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRASC_CACHE", str(tmp_path))
    text = BASE.replace("Hostile", "HostileKey")
    first = load_source(text, "key.miras")
    monkeypatch.setattr(compiler, "toolchain_hash", lambda: "a different mirasc")
    second = load_source(text, "key.miras")
    assert first.__file__ != second.__file__  # an edited mirasc compiles again
    assert len(list(tmp_path.glob("key_*.py"))) == 2


def test_toolchain_hash_sees_templates_and_grammar():
    compiler.toolchain_hash.cache_clear()
    digest = compiler.toolchain_hash()
    assert len(digest) == 64 and compiler.toolchain_hash() == digest
    from mirasc._resources import resource_dir
    grammar = resource_dir("grammar") / "miras.lark"
    original = grammar.read_bytes()
    try:
        grammar.write_bytes(original + b"\n// edited\n")
        compiler.toolchain_hash.cache_clear()
        assert compiler.toolchain_hash() != digest
    finally:
        grammar.write_bytes(original)
        compiler.toolchain_hash.cache_clear()
    assert compiler.toolchain_hash() == digest


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled"])
def test_damaged_cache_file_is_recompiled(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("MIRASC_CACHE", str(tmp_path))
    text = BASE.replace("Hostile", f"HostileDamaged{damage.title()}")
    stem = f"dmg_{compiler.cache_key(text)}"
    target = tmp_path / f"{stem}.py"
    good = compiler._sealed(compile_spec(text, "dmg.miras").source)
    bad = {"empty": "", "truncated": good[: len(good) // 2],
           "garbled": good.replace("def ", "raise SystemExit('imported a garbled file')\ndef ", 1)}[damage]
    target.write_text(bad)
    module = load_source(text, "dmg.miras")
    assert Path(module.__file__) == target and target.read_text() == good
    assert hasattr(module, "memory")


def test_stale_tmp_files_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRASC_CACHE", str(tmp_path))
    old, fresh = tmp_path / ".x.py.1.ab.tmp", tmp_path / ".y.py.2.cd.tmp"
    for f in (old, fresh):
        f.write_text("partial")
    past = time.time() - 2 * compiler.STALE_TMP_SECONDS
    os.utime(old, (past, past))
    load_source(BASE.replace("Hostile", "HostileTmp"), "tmpclean.miras")
    assert not old.exists() and fresh.exists()


# ---- item 4: the file path in generated code ----------------------------------------------------------


def test_file_name_cannot_inject_code(tmp_path, capsys):
    spec = tmp_path / 'a"""\nimport os\n.miras'
    spec.write_text(BASE)
    source = compile_spec(BASE, str(spec)).source
    plain = compile_spec(BASE, str(tmp_path / "plain.miras")).source
    tree, plain_tree = ast.parse(source), ast.parse(plain)
    assert [type(n).__name__ for n in tree.body] == [type(n).__name__ for n in plain_tree.body]
    assert ast.dump(tree.body[1]) == ast.dump(plain_tree.body[1])  # no statement between docstring and code
    doc = ast.get_docstring(tree)
    assert repr(str(spec)).replace('"', '\\"') not in doc and 'a"""' in doc  # the escapes became quotes
    header = [line for line in source.splitlines()[:10] if line.startswith("# spec:")]
    assert len(header) == 1 and "\\n" in header[0]
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    (written,) = (tmp_path / "out").glob("*.py")
    ast.parse(written.read_text())


@pytest.mark.parametrize("expr", ["norm(abs((sqrt(y) / (2)^2)))", "sum(abs(sqrt(y - v)) * abs(log(y)))"])
def test_abs_of_a_value_sympy_cannot_prove_real_compiles(expr):
    """Found by the fuzzer: check accepted these and derive left unevaluated derivatives of re()/im()."""
    compiled = compile_spec(with_bias(expr), "real.miras")
    text = str(compiled.ir.bias.grad) + str(compiled.ir.bias.vjp.dy)
    assert "Derivative" not in text and "atan2" not in text and " re(" not in text


def test_huge_power_derives_quickly():
    """Found by the fuzzer: lp(p=65537) spent minutes in together()/simplify expanding x^(65537/2)."""
    start = time.perf_counter()
    compile_spec(BASE.replace("bias l2", "bias lp(p=65537)"), "huge_p.miras")
    assert time.perf_counter() - start < 10
