"""The activations table (mirasc/symbolic/activations.py) and what the printers derive from it: the
Triton functions _tl_act/_tl_dact/_tl_d2act under Triton's interpreter and the torch _act/_act_grad,
each against torch.autograd's first and second derivatives of the torch forward, on fresh random inputs
that include large |z|; the gates' inverses against their forward."""
from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mirasc import catalog
from mirasc.codegen.emit import CodegenError, inverse_activation
from mirasc.codegen.printers import torch_activation_source, triton_activation_source
from mirasc.frontend.check import ACTIVATION_RANGE
from mirasc.symbolic.activations import ACTIVATIONS, GATES, HIDDEN

# The torch forward the oracle differentiates: written here independently of the table.
TORCH = {
    "gelu": lambda z: F.gelu(z), "silu": F.silu, "relu": torch.relu, "tanh": torch.tanh, "identity": lambda z: z,
    "sigmoid": torch.sigmoid, "softplus": F.softplus, "exp": torch.exp,
}
# What autograd differentiates: F.softplus's backward is 1 exactly above its threshold 20, so the exact
# derivative sigmoid(z) comes from log(1 + exp(z)) written as logaddexp.
ORACLE = dict(TORCH, softplus=lambda z: torch.logaddexp(z, torch.zeros_like(z)))
TRITON_ACTS = [a for a in ACTIVATIONS if a != "softplus"]  # softplus's Triton form needs TRITON_HELPERS
_COUNTER = itertools.count()


def test_every_activation_has_an_oracle():
    assert set(ACTIVATIONS) == set(TORCH)


def test_the_language_offers_the_table_rows():
    """The spec checker's lists and ranges are the table's (they are written out in mirasc.catalog and
    mirasc.frontend.check)."""
    assert set(catalog.ACTIVATIONS) == set(HIDDEN)
    assert set(catalog.GATE_ACTIVATIONS) == set(GATES)
    assert ACTIVATION_RANGE == {n: ACTIVATIONS[n].values for n in GATES}


def _inputs(name: str, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Fresh normal values, a few large ones (|z| up to 60; exp to 30, where it stays finite in fp32)
    and no exact zero (relu's derivative jumps there)."""
    g = torch.Generator().manual_seed(seed)
    big = 30.0 if name == "exp" else 60.0
    z = torch.cat([torch.randn(200, generator=g, dtype=dtype) * 3.0,
                   (torch.rand(56, generator=g, dtype=dtype) * 2 - 1) * big])
    return torch.where(z.abs() < 1e-3, z.new_full((), 0.5), z)


def _autograd(name: str, z: torch.Tensor):
    """(act, act', act'') by torch.autograd of the torch forward."""
    z = z.detach().clone().requires_grad_(True)
    a = ORACLE[name](z)
    (d1,) = torch.autograd.grad(a.sum(), z, create_graph=True)
    if d1.requires_grad:
        (d2,) = torch.autograd.grad(d1.sum(), z)
    else:  # piecewise-linear (relu) or affine: the second derivative is 0
        d2 = torch.zeros_like(z)
    return a.detach(), d1.detach(), d2.detach()


def _load(source: str, tmp_path):
    path = tmp_path / f"_act_{next(_COUNTER)}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_KERNEL = """

@triton.jit
def act_kernel(z_ptr, a_ptr, d1_ptr, d2_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    z = tl.load(z_ptr + r)
    tl.store(a_ptr + r, _tl_act(z))
    tl.store(d1_ptr + r, _tl_dact(z))
    tl.store(d2_ptr + r, _tl_d2act(z))
"""


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # sigmoid(-120): 0, right
@pytest.mark.parametrize("name", TRITON_ACTS)
def test_triton_activation_matches_autograd(name, tmp_path):
    pytest.importorskip("triton")
    source = "import triton\nimport triton.language as tl\n\n\n" + triton_activation_source(name) + _KERNEL
    module = _load(source, tmp_path)
    for seed in (1, 2):
        z = _inputs(name, 100 * seed + len(name)).float()
        outs = [torch.empty_like(z) for _ in range(3)]
        module.act_kernel[(1,)](z, *outs, N=z.numel())
        for got, want, what in zip(outs, _autograd(name, z.double()), ("act", "act'", "act''")):
            scale = want.abs().clamp_min(1.0)
            err = ((got.double() - want) / scale).abs().max().item()
            assert math.isfinite(err) and err < 2e-5, f"{name} {what}: relative error {err}"


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_torch_activation_matches_autograd(name, tmp_path):
    source = "import torch\nimport torch.nn.functional as F\n\n\n" + torch_activation_source(name) + "\n"
    module = _load(source, tmp_path)
    for seed in (3, 4):
        z = _inputs(name, 100 * seed + len(name))
        _, d1, _ = _autograd(name, z)
        torch.testing.assert_close(module._act(z), TORCH[name](z), rtol=0, atol=0)  # the fused torch call
        torch.testing.assert_close(module._act_grad(z), d1, rtol=1e-10, atol=1e-12)


def test_softplus_has_no_standalone_triton_form():
    with pytest.raises(ValueError, match="softplus"):
        triton_activation_source("softplus")


@pytest.mark.parametrize("name", [n for n, a in ACTIVATIONS.items() if a.inverse is not None])
def test_inverse_starts_the_gate_at_its_value(name):
    lo, hi = ACTIVATIONS[name].values
    g = torch.Generator().manual_seed(11)
    span = (max(lo, -5.0), min(hi, 5.0))
    values = torch.rand(50, generator=g, dtype=torch.float64) * (span[1] - span[0]) + span[0]
    values = values[(values > lo) & (values < hi) & (values != 0)]
    for value in values.tolist() + ([40.0] if hi == math.inf else []):
        raw = inverse_activation(name, value)
        back = TORCH[name](torch.tensor(raw, dtype=torch.float64)).item()
        assert back == pytest.approx(value, rel=1e-12, abs=1e-14), (name, value, raw)
    if lo != -math.inf:
        with pytest.raises(CodegenError, match=f"{name} cannot start at"):
            inverse_activation(name, lo)
    with pytest.raises(CodegenError, match="unknown activation"):
        inverse_activation("nope", 0.5)
