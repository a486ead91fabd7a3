"""The triton backend of MLP memories with a non-linear retention map (kl, bregman, elastic_net): the torch
backend's chunk loop with every token's read-out through the map in Triton kernels (templates/
triton_mlp_map.py.j2), against the reference backend in float64.

On a machine without a GPU the kernels run in Triton's interpreter (conftest.py), at small shapes. Each
comparison checks the outputs, the final state and the gradients of q, k, v, every gate and every
initial-state tensor (tests/test_triton_mlp.py's _compare).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import compile_module, make_inputs, make_state, rel
from test_triton_mlp import ALPHA, BETA, ETA, MlpVariant, _compare

SEED = 4100
_v = MlpVariant

# Memora's map (kl over the key axis) and the other maps, gd and momentum, with and without decay, depth 1
# to 3, chunks 1, 16 and 64 (partial last chunks), at=retained (every token's gradient point map(a_i Z_b)),
# a kl scale, a learnable and a per-token threshold, and packed sequences (cu_seqlens). The third entry is the tolerance (None: _compare's): the sigmoid map's
# weights are all positive, so a read-out sums terms of one sign through the LayerNorm and loses fp32
# digits; the torch backend in fp32 shows the same error against the float64 reference (1e-3 on dq).
CASES = {
    "kl_decay_gd_c16": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA, ALPHA],
                           "decay(alpha) + kl(axis=key)", "gd(lr=eta, chunk=16)"), None, None),
    "kl_momentum_c16_packed": (_v("expansion=2, act=silu, residual=true, norm=false", "l2", [ETA, ALPHA, BETA],
                                  "decay(alpha) + kl(axis=key, scale=2)", "momentum(beta=b, lr=eta, chunk=16)"),
                               [0, 16, 19, 40], None),
    "kl_gd_c64_depth1": (_v("expansion=1, act=gelu, residual=true, norm=true", "lp(p=3)", [ETA], "kl(axis=key)",
                            "gd(lr=eta, chunk=64)", T=70, depth=1), None, None),
    "kl_decay_c1_depth3": (_v("expansion=1, act=tanh, residual=true, norm=true", "l2", [ETA, ALPHA],
                              "decay(alpha) + kl(axis=key)", "gd(lr=eta, chunk=1)", T=6, depth=3), None, None),
    "kl_retained_momentum_c16": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA, ALPHA, BETA],
                                    "decay(alpha) + kl(axis=key)", "momentum(beta=b, lr=eta, chunk=16, at=retained)",
                                    T=24), None, None),
    "bregman_decay_momentum_c16": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2",
                                      [ETA, ALPHA, BETA], "decay(alpha) + bregman(sigmoid)",
                                      "momentum(beta=b, lr=eta, chunk=16)"), None, 4e-3),
    "bregman_gd_c1_packed": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA], "bregman(sigmoid)",
                                "gd(lr=eta, chunk=1)", B=1), [0, 3, 7], 4e-3),
    "elastic_ftrl_c16": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2",
                            [ETA, ALPHA, "param g = learnable(0.02, softplus)"],
                            "decay(alpha) + elastic_net(gamma=g, form=ftrl)",
                            "gd(lr=eta, chunk=16)"), None, None),
    "elastic_retain_token_gamma_c64": (_v("expansion=2, act=silu, residual=true, norm=false", "l2",
                                          [ETA, ALPHA, "gate g : head = softplus(rank=4, init=0.02)"],
                                          "decay(alpha) + elastic_net(gamma=g, form=retain)",
                                          "gd(lr=eta, chunk=64)", T=70), None, None),
    "elastic_ftrl_decay_c1_packed": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA, ALPHA],
                                       "decay(alpha) + elastic_net(gamma=0.02, form=ftrl)", "gd(lr=eta, chunk=1)",
                                       T=7), [0, 4, 7], None),
    "elastic_retain_momentum_c16": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA, BETA],
                                       "elastic_net(gamma=0.01)", "momentum(beta=b, lr=eta, chunk=16)", T=37, B=2),
                                    None, None),
}


def _compile(name, variant, tmp_path):
    return compile_module(variant.spec(name), f"{name}.miras", tmp_path, f"_mlp_map_{name}")


@pytest.mark.parametrize("name", list(CASES))
def test_map_readout_matches_reference(name, tmp_path):
    variant, cu, tol = CASES[name]
    module, compiled = _compile(name, variant, tmp_path)
    assert module.TRITON_KERNELS == "MLP map read-out" and "_map_readout_bwd_kernel" in compiled.source
    T = variant.T if cu is None else cu[-1]
    _compare(module, compiled.ir, variant.dtype, compiled.ir.algorithm.chunk, variant.B if cu is None else 1, 2,
             variant.K, variant.V, T, seed=SEED + list(CASES).index(name), tol=tol,
             cu_seqlens=None if cu is None else torch.tensor(cu))


def test_memora_example_matches_reference(compiled_examples):
    """The example itself (chunk 64, x4, LN and residual) at head dim 16 over two chunks, on this family's
    kernels (not the MLP chunk kernels')."""
    module, ir = compiled_examples["memora"]
    assert module.TRITON_KERNELS == "MLP map read-out" and not hasattr(module, "_mlp_bwd_kernel")
    _compare(module, ir, torch.float32, 64, 1, 2, 16, 16, 80, seed=SEED + 99)


def test_kl_value_axis_is_refused(tmp_path):
    """kl over the value or all axes has no read-out kernel: the module says why, and backend='triton'
    raises it; auto runs the torch backend."""
    text = CASES["kl_decay_gd_c16"][0].spec("kl_value").replace("kl(axis=key)", "kl(axis=value)")
    module, compiled = compile_module(text, "kl_value.miras", tmp_path, "_mlp_map_kl_value")
    assert "_map_readout" not in compiled.source and "_mlp_bwd_kernel" not in compiled.source
    assert module.TRITON_KERNELS is None and "'value' axis" in module.TRITON_REASON
    q, k, v, params, gen = make_inputs(compiled.ir, 1, 8, 2, 16, 16, dtype=torch.float32, seed=2)
    s0 = make_state(compiled.ir, 1, 2, 16, 16, gen=gen)
    with pytest.raises(NotImplementedError, match="'value' axis"):
        module.memory(q, k, v, **params, initial_state=s0, backend="triton")
    o_auto, _ = module.memory(q, k, v, **params, initial_state=s0)
    o_torch, _ = module.memory(q, k, v, **params, initial_state=s0, backend="torch")
    assert torch.equal(o_auto, o_torch)


def test_bf16_inputs(tmp_path):
    variant = CASES["kl_decay_gd_c16"][0]
    module, compiled = _compile("kl_bf16", variant, tmp_path)
    _compare(module, compiled.ir, torch.bfloat16, 16, 1, 2, 16, 16, 24, seed=SEED + 7)


def test_float64_refused(tmp_path):
    module, compiled = _compile("kl_f64", CASES["kl_decay_gd_c16"][0], tmp_path)
    q, k, v, params, gen = make_inputs(compiled.ir, 1, 8, 2, 16, 16, dtype=torch.float64, seed=1)
    with pytest.raises(ValueError, match="float64"):
        module.memory(q, k, v, **params, initial_state=make_state(compiled.ir, 1, 2, 16, 16, gen=gen),
                      backend="triton")


def test_readout_equals_materialised(tmp_path):
    """_map_readout alone against the per-token states written out in torch: p_i = h_i map(Z_i) with
    Z_i = alpha_i Z_(i-1) - (beta_i m_(i-1) + a_i^T d_i), every gradient by torch.autograd."""
    module, _ = _compile("kl_unit", CASES["kl_momentum_c16_packed"][0], tmp_path)
    gen = torch.Generator().manual_seed(SEED + 3)
    B, H, C, DI, DO = 2, 2, 5, 12, 20  # d_in, d_out not powers of two; 20 columns span two tiles below
    module._MAP_TILE = 16 * 8  # BI = 16 rows by 8 columns per program: three column tiles
    h, a = (torch.randn(B, H, C, DI, generator=gen, dtype=torch.float64) for _ in range(2))
    d = 0.3 * torch.randn(B, H, C, DO, generator=gen, dtype=torch.float64)
    z, m = (torch.randn(B, H, DI, DO, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha, beta = (torch.rand(B, H, C, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.5 for _ in range(2))
    leaves = [x.requires_grad_() for x in (h, z, m, a, d, alpha, beta)]
    w_p = torch.randn(B, H, C, DO, generator=gen, dtype=torch.float64)
    w_z = torch.randn(B, H, DI, DO, generator=gen, dtype=torch.float64)

    def run(fused):
        if fused:
            p, z_end = module._map_readout(*(x.float() for x in leaves), None)
        else:
            zi, mi, ps = z, m, []
            for i in range(C):
                mi = beta[:, :, i, :, None] * mi + a[:, :, i, :, None] * d[:, :, i, None, :]
                zi = alpha[:, :, i, :, None] * zi - mi
                ps.append((h[:, :, i, :, None] * 2.0 * torch.softmax(zi, dim=-2)).sum(-2))
            p, z_end = torch.stack(ps, 2), zi
        loss = (p.double() * w_p).sum() + (z_end.double() * w_z).sum()
        return [p, z_end], torch.autograd.grad(loss, leaves)

    (p, z_end), grads = run(True)
    (p_ref, z_ref), grads_ref = run(False)
    assert rel(p, p_ref) < 1e-5 and rel(z_end, z_ref) < 1e-5
    for what, g, g_ref in zip(["h", "z", "m", "a", "d", "alpha", "beta"], grads, grads_ref, strict=True):
        assert g_ref.abs().sum() > 0 and rel(g, g_ref) < 1e-5, f"d{what}: {rel(g, g_ref):.2e}"

