"""The matrix-memory kernels of the retention maps (templates/triton_linear_map.py.j2: kl, bregman, elastic
net) against the generated reference backend in float64: outputs, final states and every gradient, on
fresh random inputs, with the kernels running in Triton's interpreter (TRITON_INTERPRET=1, conftest.py)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from conftest import LinearVariant, compile_module, indexed_params, make_inputs, rel

from mirasc.codegen.plan import Refusal
from mirasc.codegen.plan.linear import plan_linear, refusal_reason
from mirasc.codegen.plan.step import plan_step
from mirasc.compiler import compile_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
A = "gate a : head = sigmoid(rank=4, init=0.9)"
ETA = "gate eta : head = softplus(rank=4, init=0.1)"
B_MOM = "gate b : head = sigmoid(rank=4, init=0.8)"
GAM = "gate gam : head = softplus(rank=4, init=0.05)"

# (variant, packed): every map with and without decay, gd and momentum, chunks 1, 4, 16 and 64 (T = 80: the
# last chunk is partial), per-head and per-channel gates, packed sequences (cu_seqlens), bf16 q, k, v
MAP_VARIANTS = [
    (LinearVariant("kl_key_decay", "l2", [A, ETA], "decay(a) + kl(axis=key)", "eta", 16, T=37), False),
    (LinearVariant("kl_value_scaled", "l2", [ETA], "kl(axis=value, scale=2.0)", "eta", 1, T=19), False),
    (LinearVariant("kl_all_momentum", "l2", [A, ETA, B_MOM], "decay(a) + kl(axis=all)", "eta", 16, beta="b",
                   T=37), False),
    (LinearVariant("kl_key_chunk64", "l2", [A, ETA], "decay(a) + kl(axis=key)", "eta", 64, T=80), False),
    (LinearVariant("bregman", "l2", [ETA], "bregman(sigmoid)", "eta", 16, K=32, T=37), False),
    (LinearVariant("bregman_bf16", "l2", [A, ETA], "decay(a) + bregman(sigmoid)", "eta", 4, dtype=torch.bfloat16,
                   T=23), False),
    (LinearVariant("bregman_decay_momentum", "huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)", A,
                   ETA, "param b = learnable(0.8, sigmoid)"], "decay(a) + bregman(sigmoid)", "eta", 1, beta="b",
                   T=21), False),
    (LinearVariant("elastic_ftrl_const", "l2", [ETA], "elastic_net(0.05, form=ftrl)", "eta", 16, T=37), False),
    (LinearVariant("elastic_ftrl_learnable_decay", "l2", [A, ETA, "param gam = learnable(0.05, softplus)"],
                   "decay(a) + elastic_net(gam, form=ftrl)", "eta", 1, V=32, T=19), False),
    (LinearVariant("elastic_retain_gate", "l2", [A, ETA, GAM],
                   "decay(a) + elastic_net(gam, form=retain)", "eta", 16, T=37), False),
    (LinearVariant("elastic_retain_const_momentum", "l2", [ETA, B_MOM], "elastic_net(0.05, form=retain)", "eta",
                   64, beta="b", T=80), False),
    (LinearVariant("elastic_retain_channel_gates", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                   "gate eta : channel = softplus(rank=4, init=0.1)",
                   "gate gam : channel = softplus(rank=4, init=0.05)"],
                   "decay(a) + elastic_net(gam, form=retain)", "eta", 1, T=21), False),
    # at=retained: token i's gradient point is map(a_i Z_b) (S_gamma's form=retain: a_i Z_b)
    (LinearVariant("kl_value_retained", "l2", [A, ETA], "decay(a) + kl(axis=value)", "eta", 16, at="retained",
                   T=37), False),
    (LinearVariant("bregman_retained_channel_momentum", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                   ETA, B_MOM], "decay(a) + bregman(sigmoid)", "eta", 4, at="retained", beta="b", T=21), False),
    (LinearVariant("elastic_ftrl_retained", "l2", [A, ETA], "decay(a) + elastic_net(0.05, form=ftrl)", "eta", 1,
                   at="retained", T=19), False),
    (LinearVariant("elastic_retain_retained_chunk64", "l2", [A, ETA, GAM],
                   "decay(a) + elastic_net(gam, form=retain)", "eta", 64, at="retained", T=80), False),
    # wide heads: 128 x 64 runs as 2 column slices of 128 x 32 (the gates per channel cut with them)
    (LinearVariant("kl_key_wide_slices", "l2", [A, ETA], "decay(a) + kl(axis=key)", "eta", 16, K=128, V=64,
                   T=19), False),
    (LinearVariant("elastic_retain_wide_channel_slices", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)", ETA,
                   "gate gam : channel = softplus(rank=4, init=0.05)"], "decay(a) + elastic_net(gam, form=retain)",
                   "eta", 4, at="retained", K=128, V=64, T=13), False),
    (LinearVariant("kl_key_packed", "l2", [A, ETA], "decay(a) + kl(axis=key)", "eta", 16, T=50), True),
    (LinearVariant("elastic_retain_packed_momentum", "l2", [A, ETA, B_MOM, GAM],
                   "decay(a) + elastic_net(gam, form=retain)", "eta", 1, beta="b", T=30), True),
]


def _run(module, backend, dtype, chunk, q, k, v, params, s0, w_o, w_s, cu_seqlens):
    """memory() and the backward of a random linear function of its output and final state; the leaves
    are q, k, v, the parameters and the initial state's tensors."""
    parts = list(s0)
    leaves = [x.to(DEVICE, dtype if i < 3 or dtype == torch.float64 else torch.float32).detach().requires_grad_()
              for i, x in enumerate([q, k, v, *params.values(), *parts])]
    p = dict(zip(params, leaves[3:len(leaves) - len(parts)]))
    init = tuple(leaves[-len(parts):]) if len(parts) == 2 else leaves[-1]
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    o, s = module.memory(*leaves[:3], **p, initial_state=init, output_final_state=True, chunk_size=chunk,
                         backend=backend, cu_seqlens=cu)
    finals = list(s) if isinstance(s, tuple) else [s]
    loss = (o.double() * w_o.to(DEVICE)).sum()
    for x, w in zip(finals, w_s):
        loss = loss + (x.double() * w.to(DEVICE)).sum()
    loss.backward()
    return [o, *finals], leaves


@pytest.mark.parametrize(("i", "variant", "packed"),
                         [pytest.param(i, v, packed, id=p.id + ("-packed" if packed else ""))
                          for (i, p), (v, packed) in zip(
                              enumerate(indexed_params([v for v, _ in MAP_VARIANTS])), MAP_VARIANTS)])
def test_map_kernels_match_reference(i, variant, packed, tmp_path):
    module, compiled = compile_module(variant.spec(f"Map{i}"), f"map{i}.miras", tmp_path, f"_map{i}")
    ir = compiled.ir
    assert "_memory_triton" in vars(module), refusal_reason(ir)
    assert module._chunk_fwd_kernel.fn.__name__ == "_chunk_fwd_kernel" and "_map_fwd" in compiled.source
    chunk, K, V, T = variant.chunk, variant.K, variant.V, variant.T
    assert module._value_slices(K, V, chunk, variant.dtype) == (2 if K * V > 64 * 64 else 1)
    H = 2
    if packed:  # B = 1 holds three sequences, one of them shorter than a chunk
        B, lens = 1, [T - 21, 9, 12]
        cu_seqlens = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        T, N = sum(lens), len(lens)
    else:
        B, cu_seqlens, N = 2, None, 2
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=4100 + i)
    q, k, v = (x.to(variant.dtype).double() for x in (q, k, v))  # values a bf16 run sees exactly
    n = 2 if variant.beta is not None else 1
    s0 = [0.3 * torch.randn(N, H, K, V, dtype=torch.float64, generator=gen) for _ in range(n)]
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = [torch.randn(N, H, K, V, dtype=torch.float64, generator=gen) for _ in range(n)]
    outs, leaves = _run(module, "triton", variant.dtype, chunk, q, k, v, params, s0, w_o, w_s, cu_seqlens)
    tol = 2e-4 if variant.dtype == torch.float32 else 2e-2
    ref_outs, ref_leaves = _run(module, "reference", torch.float64, chunk, q, k, v, params, s0, w_o, w_s,
                                cu_seqlens)
    for what, a, b in zip(["o", "final Z", "final m"], outs, ref_outs):
        assert torch.isfinite(b).all(), f"{what}: the reference diverges on these inputs"
        assert torch.isfinite(a).all(), what
        assert rel(a, b) < tol, f"{what}: relative error {rel(a, b):.2e}"
    for what, a, b in zip(["q", "k", "v", *params, "Z0", "m0"], leaves, ref_leaves):
        assert a.grad is not None and torch.isfinite(a.grad).all(), f"d{what}"
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert rel(a.grad, b.grad) < tol, f"d{what}: relative error {rel(a.grad, b.grad):.2e}"


def _ir(retention: str, decls=(ETA,), beta=None, at="previous", chunk=16):
    spec = LinearVariant("x", "l2", list(decls), retention, "eta", chunk, at=at, beta=beta).spec("Plan")
    return compile_spec(spec, "plan.miras").ir


def test_plan_map_kernels():
    """The plan picks the map kernels and their flags, the fused decode step covers them, and lq on a matrix
    memory keeps its refusal."""
    plan = plan_linear(_ir("kl(axis=value, scale=2.0)"))
    assert plan.kernels == "map"
    f = plan.map_flags
    assert (f.map, f.axis, f.scale, f.prox) == (1, 1, 2.0, False)
    assert not plan.column_separable  # a softmax over the values couples the columns
    plan = plan_linear(_ir("kl(axis=key)"))
    assert plan.map_flags.axis == 0 and plan.column_separable
    plan = plan_linear(_ir("decay(a) + elastic_net(gam, form=retain)",
                           (ETA, A, "gate gam : channel = softplus(rank=4, init=0.05)", B_MOM), beta="b"))
    f = plan.map_flags
    assert (plan.kernels, f.map, f.prox, f.gamma_channel, f.alpha_channel, plan.momentum) == (
        "map", 3, True, True, False, True)
    plan = plan_linear(_ir("bregman(sigmoid)", (ETA, "gate a : channel = sigmoid(rank=4, init=0.9)"), beta="a"))
    assert (plan.kernels, plan.map_flags.map, plan.map_flags.beta_channel) == ("map", 2, True)
    assert plan_linear(_ir("elastic_net(0.1, form=ftrl)")).map_flags.prox is False
    retained = plan_linear(_ir("decay(a) + kl(axis=key)", (ETA, A), at="retained"))
    assert retained.kernels == "map" and retained.at_retained
    assert not isinstance(plan_step(_ir("kl(axis=key)")), Refusal)  # the fused decode step covers the maps
    assert "retention map 'lq'" in refusal_reason(_ir("decay(0.9) + lq(q=3)"))


def test_map_kernels_refuse_wide_coupled_heads(tmp_path):
    """A softmax over the values cannot run as column slices: a head wider than one program takes the torch
    backend under "auto" and a clear error under "triton"."""
    variant = LinearVariant("kl_value_wide", "l2", [ETA], "kl(axis=value)", "eta", 16, K=64, V=128)
    module, compiled = compile_module(variant.spec("Wide"), "wide.miras", tmp_path, "_map_wide")
    assert not module._COLUMN_SEPARABLE and module._value_slices(64, 128, 16, torch.float32) is None
    assert module._value_slices(64, 64, 16, torch.float32) == 1
    q, k, v, params, _ = make_inputs(compiled.ir, 1, 5, 2, 64, 128, dtype=torch.float32)
    with pytest.raises(ValueError, match="softmax couples the value columns"):
        module.memory(q, k, v, **params, chunk_size=16, backend="triton")
    o, _ = module.memory(q, k, v, **params, chunk_size=16, backend="auto")
    ref, _ = module.memory(q, k, v, **params, chunk_size=16, backend="reference")
    assert rel(o, ref) < 1e-4


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff missing")
def test_map_modules_are_ruff_clean(tmp_path):
    """Every layer above, generated with its map kernels, passes the generated code's lint."""
    files = []
    for i, (variant, _) in enumerate(MAP_VARIANTS):
        compiled = compile_spec(variant.spec(f"Lint{i}"), f"lint{i}.miras")
        assert "def _chunk_bwd_kernel" in compiled.source and "_map_vjp" in compiled.source, variant.name
        files.append(tmp_path / f"lint{i}.py")
        files[-1].write_text(compiled.source)
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    res = subprocess.run([ruff, "check", "--isolated", "--line-length", "110", "--extend-select", "E,W", *map(str, files)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
