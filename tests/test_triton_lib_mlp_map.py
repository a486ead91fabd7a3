"""The MLP map read-out kernels' library functions (mirasc/codegen/triton_lib/mlp_map.py), under Triton's
interpreter against a torch oracle on fresh random data."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_lib import load_with_library

_WALK = """
@triton.jit
def walk_kernel(z_ptr, m_ptr, a_ptr, d_ptr, alpha_ptr, beta_ptr, zo_ptr, mo_ptr, C, DI, DO, c0,
                BI: tl.constexpr, BO: tl.constexpr, DECAY: tl.constexpr, MOMENTUM: tl.constexpr):
    ri = tl.arange(0, BI)
    co = c0 + tl.arange(0, BO)
    rmask, cmask = ri < DI, co < DO
    tile = ri[:, None] * DO + co[None, :]
    tmask = rmask[:, None] & cmask[None, :]
    z = tl.load(z_ptr + tile, mask=tmask, other=0.0)
    m = tl.load(m_ptr + tile, mask=tmask, other=0.0)
    for i in range(C):
        z, m = _map_walk(z, m, a_ptr, d_ptr, alpha_ptr, beta_ptr, i, ri, co, rmask, cmask, DI, DO, DECAY,
                         MOMENTUM)
    tl.store(zo_ptr + tile, z, mask=tmask)
    tl.store(mo_ptr + tile, m, mask=tmask)
"""


@pytest.mark.parametrize(("decay", "momentum"), [(True, True), (True, False), (False, True), (False, False)])
def test_walk_matches_the_recurrence(decay, momentum, tmp_path):
    """Five tokens of the walk on the second column tile (columns 8..15 of 12: a partial tile, rows 12
    of 16) equal the recurrence written out in torch."""
    m = load_with_library(["_map_walk"], _WALK, tmp_path)
    g = torch.Generator().manual_seed(31 + 2 * decay + momentum)
    C, DI, DO = 5, 12, 12
    z, mom = torch.randn(DI, DO, generator=g), torch.randn(DI, DO, generator=g)
    a, d = torch.randn(C, DI, generator=g), torch.randn(C, DO, generator=g)
    alpha, beta = torch.rand(C, generator=g) * 0.5 + 0.5, torch.rand(C, generator=g) * 0.5 + 0.5
    zo, mo = z.clone(), mom.clone()
    m.walk_kernel[(1,)](z, mom, a, d, alpha, beta, zo, mo, C, DI, DO, 8, BI=16, BO=8, DECAY=decay,
                        MOMENTUM=momentum)
    z_ref, m_ref = z.clone(), mom.clone()
    for i in range(C):
        u = torch.outer(a[i], d[i])
        if momentum:
            m_ref = beta[i] * m_ref + u
            u = m_ref
        z_ref = (alpha[i] if decay else 1.0) * z_ref - u
    torch.testing.assert_close(zo[:, 8:], z_ref[:, 8:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mo[:, 8:], m_ref[:, 8:] if momentum else mom[:, 8:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zo[:, :8], z[:, :8])  # the other tile is untouched


_GAMMA = """
@triton.jit
def gamma_kernel(g_ptr, out_ptr, MAP: tl.constexpr):
    r = tl.arange(0, 1)
    tl.store(out_ptr + r[:, None] + r[None, :], _map_gamma(g_ptr, 2, MAP))
"""


@pytest.mark.parametrize("map_code", [1, 2, 3])
def test_gamma_is_the_tokens_threshold_only_for_the_soft_threshold(map_code, tmp_path):
    m = load_with_library(["_map_gamma"], _GAMMA, tmp_path)
    gam = torch.tensor([0.1, 0.2, 0.37, 0.4])
    out = torch.full((1, 1), -1.0)
    m.gamma_kernel[(1,)](gam, out, MAP=map_code)
    assert out.item() == pytest.approx(0.37 if map_code == 3 else 0.0)
