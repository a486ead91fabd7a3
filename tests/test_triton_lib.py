"""The Triton helper library (mirasc/codegen/triton_lib): how functions are found and pasted, and the
shared matrix products under Triton's interpreter against torch."""
from __future__ import annotations

import ast
import importlib.util
import itertools

import pytest
import torch

from mirasc.codegen import triton_lib

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def test_every_function_is_defined_once_and_parses():
    names = triton_lib.names()
    assert "_mm" in names and "_mm32" in names
    text = triton_lib.source(names)
    tree = ast.parse(text)
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert sorted(defined) == names  # each once, decorators kept
    assert all(any(isinstance(d, ast.Attribute) and d.attr == "jit" for d in n.decorator_list)
               for n in tree.body if isinstance(n, ast.FunctionDef))


def test_closure_puts_callees_first_and_rejects_unknown_names(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "a.py").write_text("def top(x):\n    return mid(x) + low(x)\n\n\ndef mid(x):\n    return low(x)\n\n\n"
                              "def low(x):\n    return x\n\n\ndef unused(x):\n    return x\n")
    monkeypatch.setattr(triton_lib, "_HERE", lib)
    triton_lib._library.cache_clear()
    try:
        assert triton_lib.closure(["top"]) == ["low", "mid", "top"]
        assert triton_lib.closure(["mid", "top"]) == ["low", "mid", "top"]
        assert triton_lib.source(["mid"], indent=4).splitlines()[0] == "    def low(x):"
        with pytest.raises(triton_lib.LibraryError, match="nope"):
            triton_lib.closure(["nope"])
        (lib / "b.py").write_text("def low(x):\n    return x\n")
        triton_lib._library.cache_clear()
        with pytest.raises(triton_lib.LibraryError, match="defined twice"):
            triton_lib.names()
    finally:
        triton_lib._library.cache_clear()


def load_with_library(names, kernels: str, folder):
    """A module of the library functions `names` (and their callees) and the test kernels `kernels`, written
    to a file and imported, as a generated module pastes the library (Triton reads a jit function's
    source from its file)."""
    path = folder / f"_tl_lib_{next(_COUNTER)}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n" + triton_lib.source(names)
                    + "\n\n\n" + kernels)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_COUNTER = itertools.count()

_PRODUCT = """
@triton.jit
def product_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, P: tl.constexpr):
    rm, rn, rp = tl.arange(0, M), tl.arange(0, N), tl.arange(0, P)
    a = tl.load(a_ptr + rm[:, None] * N + rn[None, :])
    b = tl.load(b_ptr + rn[:, None] * P + rp[None, :])
    tl.store(c_ptr + rm[:, None] * P + rp[None, :], FN(a, b, 0))
"""


@pytest.mark.parametrize("fn", ["_mm", "_mm32"])
def test_products_match_torch_in_fp32(fn, tmp_path):
    module = load_with_library([fn], _PRODUCT.replace("FN", fn), tmp_path)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(16, 32, generator=g), torch.randn(32, 16, generator=g)
    c = torch.empty(16, 16)
    module.product_kernel[(1,)](a, b, c, 16, 32, 16)
    torch.testing.assert_close(c, a @ b, rtol=1e-5, atol=1e-5)
