"""Spec names never collide with the generated code's own names (the reliability issue's item 1-2).

Kernels name the spec's runtime inputs u0, u1, ... (their place among the inputs); memory() and step()
take the spec's names as keyword arguments and pass them on in a dict; the block's submodules are the
spec's names behind "u_". These tests draw names from every identifier the generated modules use.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, import_source, make_inputs, stable_seed

from mirasc.compiler import compile_spec
from mirasc.frontend import load_spec
from mirasc.frontend.check import MODULE_NAMES
from mirasc.frontend.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent


def _internal_identifiers() -> list[str]:
    """Every identifier of every example's generated module, and every word of every template."""
    names = set()
    for path in EXAMPLES:
        src = compile_spec(path.read_text(), str(path)).source
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.NAME:
                names.add(tok.string)
    for tpl in (ROOT / "templates").glob("*.j2"):
        names |= set(re.findall(r"\b[A-Za-z][A-Za-z0-9_]*\b", tpl.read_text()))
    return sorted(names)


def _spec(names: list[str], layer: str = "Probe", memory: str = "linear", chunk: int = 4) -> str:
    """A layer whose bias reads every name: half learnable scalars, half per-head gates."""
    decls, terms = [], []
    for i, n in enumerate(names):
        if i % 2:
            decls.append(f"    gate {n} : head = sigmoid(rank=2, init=0.5)")
        else:
            decls.append(f"    param {n} = learnable(0.5, softplus)")
        terms.append(n)
    scale = " + ".join(terms)
    return "\n".join([
        f"layer {layer} {{", "    heads 2", "    key_dim 4", "    value_dim 4", f"    memory {memory}",
        *decls,
        "    gate eta_gate : head = softplus(rank=2, init=0.1)",
        f"    bias sum(log(1 + (y - v)^2)) * (1 + 0.01 * ({scale}))",
        "    retention none",
        f"    algorithm gd(lr=eta_gate, chunk={chunk})",
        "}",
    ]) + "\n"


def _accepted(names: list[str]) -> tuple[list[str], list[str]]:
    """Split names into those `check` accepts as parameter names and those it refuses (located)."""
    ok, refused = [], []
    for n in names:
        try:
            load_spec(_spec([n]), "probe.miras")
            ok.append(n)
        except SpecError as err:
            assert re.match(r"probe\.miras:\d+:\d+: ", str(err)), str(err)
            refused.append(n)
    return ok, refused


def _import(source: str, name: str):
    import tempfile
    return import_source(source, name, tempfile.mkdtemp())


PUBLIC = ("memory", "step", "bias_loss", "bias_grad", "bias_grad_vjp")


def _code_outside_public_functions(source: str) -> list[str]:
    """The Python names of a module outside its public functions: memory() and step() (their keyword
    arguments and the one line that passes them on) and the printed bias functions (whose arguments
    mirasc.codegen.printers renames where they would shadow). Strings and comments are left out."""
    spans = [(n.lineno, n.end_lineno) for n in ast.walk(ast.parse(source))
             if isinstance(n, ast.FunctionDef) and n.name in PUBLIC]
    return [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.NAME and not any(a <= tok.start[0] <= b for a, b in spans)]


def _assert_no_spec_text_in_code(names: list[str], **kw) -> None:
    """Renaming the spec's parameters leaves every Python name outside the public functions unchanged:
    no identifier of the generated code is built from a spec name."""
    fresh = [f"zq{i}x" for i in range(len(names))]
    a = _code_outside_public_functions(compile_spec(_spec(names, **kw), "probe.miras").source)
    b = _code_outside_public_functions(compile_spec(_spec(fresh, **kw), "probe.miras").source)
    assert a == b, next(f"{x} != {y}" for x, y in zip(a, b) if x != y)


def test_every_internal_identifier_as_a_name():
    """Names drawn from every identifier the templates use: each is refused with a located error, or
    compiles into a module that imports, uses it only in the public signatures, and whose torch backend
    agrees with the reference backend in float64 (outputs and the gradients of every input)."""
    ok, refused = _accepted(_internal_identifiers())
    assert len(ok) > 200  # most internal names are fine as spec names
    assert {"def", "torch", "return", "self", "chunk_size"} <= set(refused)  # keywords and reserved names
    group = 48
    for start in range(0, len(ok), group):
        names = ok[start:start + group]
        compiled = compile_spec(_spec(names), "probe.miras")
        if start == 0:
            _assert_no_spec_text_in_code(names)
            _assert_no_spec_text_in_code(names, memory="mlp(depth=2, expansion=2)")
        module = _import(compiled.source, f"_mirasc_names_{start}")
        q, k, v, params, _ = make_inputs(compiled.ir, 1, 6, 2, 4, 4, seed=stable_seed("names", start))
        outs = {}
        for backend in ("reference", "torch"):
            ins = [x.clone().requires_grad_() for x in (q, k, v)]
            ps = {n: x.clone().requires_grad_() for n, x in params.items()}
            o, _ = module.memory(*ins, **ps, backend=backend)
            o.pow(2).sum().backward()
            outs[backend] = [o.detach()] + [x.grad for x in ins] + [ps[n].grad for n in sorted(ps)]
        for a, b in zip(outs["reference"], outs["torch"]):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
        # the block builds (no name clashes with nn.Module attributes such as train, to, update)
        block = getattr(module, compiled.ir.name)(8, heads=2, key_dim=4, value_dim=4).double()
        y, _ = block(torch.randn(1, 5, 8, dtype=torch.float64))
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["train", "to", "update", "values", "params", "fn", "B", "T", "N", "device",
                                  "dtype", "n_seq", "why", "DecodeState", "gates", "base", "pos", "z"])
def test_names_reported_broken(name):
    """Names that once broke compilation, import, the call or the block's constructor."""
    compiled = compile_spec(_spec([name, "other"]), "probe.miras")
    module = _import(compiled.source, f"_mirasc_name_{name}")
    q, k, v, params, _ = make_inputs(compiled.ir, 1, 5, 2, 4, 4, seed=stable_seed(name))
    o_ref, _ = module.memory(q, k, v, **params, backend="reference")
    o, _ = module.memory(q, k, v, **params, backend="torch")
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-11)
    block = getattr(module, compiled.ir.name)(8, heads=2, key_dim=4, value_dim=4)
    assert f"learnables.u_{name}" in block.state_dict()  # _spec makes the first name a learnable
    assert any(k.startswith("gates.u_other.") for k in block.state_dict())


def test_triton_gradients_with_colliding_names():
    """The issue's KProbe: parameters c and c_acc (and c_ptr beside c) once shared kernel variables,
    giving Triton gradients 74% and 320% off the torch backend's with equal outputs."""
    spec = """layer KProbe {
    heads 2
    key_dim 16
    value_dim 16
    memory linear
    param c = learnable(1.0, softplus)
    param c_acc = learnable(0.5, softplus)
    param c_ptr = learnable(0.5, softplus)
    gate eta : head = softplus(rank=4, init=0.5)
    gate alpha : head = sigmoid(rank=4, init=0.9)
    bias sum(log(1 + ((y - v) / c)^2)) + c_acc * mean((y - v)^2) + 0.1 * c_ptr * mean((y - v)^2)
    retention decay(alpha)
    algorithm gd(lr=eta, chunk=16)
}
"""
    compiled = compile_spec(spec, "kprobe.miras")
    module = _import(compiled.source, "_mirasc_kprobe")
    q, k, v, params, _ = make_inputs(compiled.ir, 1, 20, 2, 16, 16, dtype=torch.float32, seed=7)
    grads = {}
    for backend in ("torch", "triton"):
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        ps = {n: x.clone().requires_grad_() for n, x in params.items()}
        o, _ = module.memory(*ins, **ps, backend=backend, chunk_size=16)
        w = torch.sin(torch.arange(o.numel(), dtype=torch.float32)).reshape(o.shape)
        (o * w).sum().backward()
        grads[backend] = {"o": o.detach(), "q": ins[0].grad, "k": ins[1].grad, "v": ins[2].grad,
                          **{n: p.grad for n, p in ps.items()}}
    for name, ref in grads["torch"].items():
        got = grads["triton"][name]
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_module_names_list_is_complete():
    """Every public module-level name of a generated module is reserved for layer names."""
    for path in EXAMPLES:
        compiled = compile_spec(path.read_text(), str(path))
        tree = ast.parse(compiled.source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.col_offset in (0, 4):
                defined = node.name
            elif isinstance(node, ast.Assign) and node.col_offset == 0:
                defined = next((t.id for t in node.targets if isinstance(t, ast.Name)), "_")
            else:
                continue
            if node.col_offset == 4 and not isinstance(node, ast.FunctionDef):
                continue
            if defined.startswith("_") or defined == compiled.ir.name:
                continue
            if node.col_offset == 4 and defined not in MODULE_NAMES:
                continue  # methods
            assert defined in MODULE_NAMES, f"{path.name}: {defined} is not reserved for layer names"


@pytest.mark.parametrize("layer", sorted(MODULE_NAMES))
def test_layer_name_reserved(layer):
    with pytest.raises(SpecError, match=r"probe\.miras:1:7: error: layer name"):
        compile_spec(_spec(["a"], layer=layer), "probe.miras")


def test_long_names():
    """86+ character names once compiled into invalid Python (a wrapped identifier): names have a
    documented limit, and names at the limit compile into valid modules."""
    long = "a" * 64
    compiled = compile_spec(_spec([long, "b" * 63 + "c"], layer="L" * 64), "probe.miras")
    ast.parse(compiled.source)
    with pytest.raises(SpecError, match="at most 64"):
        compile_spec(_spec(["a" * 65]), "probe.miras")
    with pytest.raises(SpecError, match="at most 64"):
        compile_spec(_spec(["a"], layer="L" * 120), "probe.miras")


@pytest.mark.parametrize("layer", ["decoding", "Xcoding", "latin_coding"])
def test_layer_name_that_reads_as_an_encoding_declaration(layer):
    """`# decoding: ...` in the first two lines would be read as a source encoding (PEP 263): the name
    ends line 1 and the spec's path (which may hold `coding:`) comes later."""
    compiled = compile_spec(_spec(["a"], layer=layer), "x/coding:latin-1.miras")
    module = _import(compiled.source, f"_mirasc_enc_{layer}")
    assert hasattr(module, layer)
