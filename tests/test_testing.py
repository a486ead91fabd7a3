"""mirasc/testing.py, the helpers the tests, the benchmarks and `mirasc bench` share: compiled modules
import from their file, drawn inputs have the documented shapes, dtypes and ranges, the same seed draws
the same values (and another seed others), and drawn states are finite and never zero."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT

from mirasc import testing
from mirasc.testing import (
    STABLE_RANGES,
    compile_module,
    cu_seqlens,
    draw_lengths,
    flatten_state,
    layer_dims,
    long_sequence_range,
    make_inputs,
    make_state,
    rel,
    stable_range,
    stable_seed,
)

B, T, H, K, V = 2, 5, 2, 8, 6

# Per-head and per-channel gates under every activation, learnables and a constant, on a matrix memory
# under momentum: every kind of runtime input the helpers draw.
GATES = """layer Gates {
    heads 2
    key_dim 8
    value_dim 6
    memory linear
    gate a : channel = sigmoid(rank=4, init=0.9)
    gate eta : head = softplus(rank=4, init=0.1)
    gate g1 : head = exp(rank=4, init=0.2)
    gate g2 : channel = relu(rank=4, init=0.2)
    gate g3 : head = tanh(rank=4, init=0.5)
    gate g4 : head = identity(rank=4, init=1.0)
    gate beta : head = sigmoid(rank=4, init=0.5)
    param c = learnable(1.0, softplus)
    const tau = 0.8
    bias tau * sum(log(1 + ((y - v) / c)^2)) + g1 * g3 * g4 * sum(g2 * y * v)
    retention decay(a)
    algorithm momentum(beta=beta, lr=eta, chunk=4)
}
"""


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    return compile_module(GATES, "gates.miras", tmp_path_factory.mktemp("testing"), "_mirasc_testing_gates")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    text = (ROOT / "examples" / "titans.miras").read_text()  # a depth-2 MLP memory under momentum
    return compile_module(text, "titans.miras", tmp_path_factory.mktemp("testing_mlp"))


def test_compile_module_imports_from_its_file(gates, tmp_path):
    module, compiled = gates
    assert sys.modules["_mirasc_testing_gates"] is module
    assert module.__file__.endswith("_mirasc_testing_gates.py")
    assert hasattr(module, "memory") and compiled.ir.name == "Gates"
    other, c2 = compile_module(GATES, "gates.miras", tmp_path, prefix="_other_")
    assert other.__name__ == f"_other_{c2.stem}" and other is not module


def test_compile_module_unregisters_a_module_that_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        testing.import_source("x = 1 / 0\n", "_mirasc_testing_broken", tmp_path)
    assert "_mirasc_testing_broken" not in sys.modules


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_inputs_shapes_dtypes_and_ranges(gates, dtype):
    _, compiled = gates
    ir = compiled.ir
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=dtype, seed=3)
    assert isinstance(gen, torch.Generator)
    assert q.shape == k.shape == (B, T, H, K) and v.shape == (B, T, H, V)
    for x in (q, k):  # unit-norm keys and queries, as the block makes them
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(B, T, H, dtype=dtype))
    assert v.std() > 0.5
    assert list(params) == [p.name for p in ir.inputs()]
    assert "tau" not in params  # a constant is not a runtime input
    for p in ir.inputs():
        x = params[p.name]
        want = (H,) if p.kind == "learnable" else (B, T, H) if p.shape == "head" else (B, T, H, V)
        assert x.shape == want and x.dtype == dtype, p.name
        lo, hi = STABLE_RANGES[p.activation]
        assert (lo <= x).all() and (x <= hi).all(), f"{p.name}: outside [{lo}, {hi}]"
        assert x.max() - x.min() > 0.1 * (hi - lo) or x.numel() < 4, f"{p.name}: not spread over its range"
    assert {p.activation for p in ir.inputs()} == set(STABLE_RANGES)  # every activation was checked


def test_ranges_can_be_chosen(gates):
    _, compiled = gates
    ir = compiled.ir
    *_, params, _ = make_inputs(ir, B, T, H, K, V, seed=0, ranges=long_sequence_range)
    assert (params["a"] >= 0.9).all() and (params["a"] <= 0.99).all()  # a decay
    assert (params["beta"] >= 0.1).all() and (params["beta"] <= 0.9).all()  # the delta rule's step
    assert (params["c"] >= 0.5).all() and (params["c"] <= 1.5).all()  # a learnable
    assert (params["eta"] >= 0.005).all() and (params["eta"] <= 0.02).all()  # a rate
    *_, fixed, _ = make_inputs(ir, B, T, H, K, V, seed=0, ranges=lambda p: (0.25, 0.25))
    assert all((x == 0.25).all() for x in fixed.values())
    assert stable_range(next(p for p in ir.inputs() if p.name == "eta")) == STABLE_RANGES["softplus"]


def test_seeds_reproduce(gates):
    _, compiled = gates
    a = make_inputs(compiled.ir, B, T, H, K, V, seed=11)
    b = make_inputs(compiled.ir, B, T, H, K, V, seed=11)
    c = make_inputs(compiled.ir, B, T, H, K, V, seed=12)
    for x, y, z in zip([*a[:3], *a[3].values()], [*b[:3], *b[3].values()], [*c[:3], *c[3].values()]):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    # a state drawn next from the returned generator follows reproducibly too
    assert all(torch.equal(x, y) for x, y in zip(make_state(compiled.ir, B, H, K, V, gen=a[4]),
                                                 make_state(compiled.ir, B, H, K, V, gen=b[4])))
    # a generator passed in is drawn from (and advanced), not replaced
    gen = torch.Generator().manual_seed(11)
    d = make_inputs(compiled.ir, B, T, H, K, V, gen=gen, seed=999)
    assert d[4] is gen and torch.equal(d[0], a[0])
    assert stable_seed("x", 1) == stable_seed("x", 1) != stable_seed("x", 2)


def test_matrix_state_under_momentum(gates):
    _, compiled = gates
    gen = torch.Generator().manual_seed(0)
    S, m = make_state(compiled.ir, B, H, K, V, dtype=torch.float32, gen=gen, scale=0.5)
    for x in (S, m):
        assert x.shape == (B, H, K, V) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and (x != 0).float().mean() > 0.99
    # weights ~ scale * N(0, 1/K), momenta ~ 0.1 N(0, 1/K)
    assert 0.5 * 0.5 < S.std() * K ** 0.5 < 0.5 * 1.5
    assert 0.1 * 0.5 < m.std() * K ** 0.5 < 0.1 * 1.5


def test_mlp_state(mlp):
    _, compiled = mlp
    ir = compiled.ir
    hidden = ir.memory.expansion * K
    assert layer_dims(ir, K, V) == [(K, hidden), (hidden, V)]
    state = make_state(ir, B, H, K, V, gen=torch.Generator().manual_seed(1))
    assert isinstance(state, tuple) and len(state) == 4  # two weights, two momentum buffers
    assert [tuple(x.shape) for x in state] == [(B, H, K, hidden), (B, H, hidden, V)] * 2
    for x in state:
        assert x.dtype == torch.float64 and torch.isfinite(x).all() and x.abs().min() > 0
    assert flatten_state(state) == list(state)


def test_linear_gd_state_is_one_tensor(tmp_path):
    text = (ROOT / "examples" / "gated_deltanet.miras").read_text()
    _, compiled = compile_module(text, "gated_deltanet.miras", tmp_path, "_mirasc_testing_gdn")
    ir = compiled.ir
    S = make_state(ir, B, H, K, V, gen=torch.Generator().manual_seed(2))
    assert torch.is_tensor(S) and S.shape == (B, H, K, V) and S.abs().min() > 0
    assert flatten_state(S) == [S] and flatten_state(None) == []


def test_lengths_and_cu_seqlens():
    lens = draw_lengths(100, 7, seed=3)
    assert len(lens) == 7 and sum(lens) == 100 and min(lens) >= 1
    assert lens == draw_lengths(100, 7, seed=3) and lens != draw_lengths(100, 7, seed=4)
    cu = cu_seqlens(lens)
    assert cu.dtype == torch.long and cu[0] == 0 and cu[-1] == 100
    assert torch.equal(cu.diff(), torch.tensor(lens))
    assert cu_seqlens([3, 4], dtype=torch.int32).tolist() == [0, 3, 7]


def test_rel():
    b = torch.tensor([3.0, 4.0])
    assert rel(b, b) == 0.0
    assert rel(b + torch.tensor([0.0, 0.5]), b) == pytest.approx(0.1)
