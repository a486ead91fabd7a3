"""Per-head constants, `param NAME = per_head(EXPR IN head)`: located errors, and RetNet's per-head decay
1 - 2^(-5 - h) (Sun et al. 2023) on every backend, at a head count other than the spec's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import compile_module

from mirasc.frontend import SpecError, load_spec
from mirasc.symbolic.explain import explain

ROOT = Path(__file__).resolve().parent.parent
RETNET = ROOT / "examples" / "retnet.miras"

SPEC = """layer P {{
    heads 4
    key_dim 8
    value_dim 8
    memory linear
    {decl}
    bias {bias}
    retention {retention}
    algorithm gd(lr={lr}, chunk=4)
}}
"""


def spec(decl, bias="dot", retention="decay(g)", lr="1"):
    return SPEC.format(decl=decl, bias=bias, retention=retention, lr=lr)


def _load(text: str, stem: str, folder: Path):
    return compile_module(text, f"<{stem}>", folder, f"_mirasc_test_per_head_{stem}")


@pytest.fixture(scope="module")
def retnet(tmp_path_factory):
    return _load(RETNET.read_text(), "retnet", tmp_path_factory.mktemp("per_head"))


# ---- errors --------------------------------------------------------------------------------------

ERRORS = [
    # (declaration, other statements, message fragment, the text the error points at)
    ("param g = per_head(1 - y)", {}, "cannot use the memory's 'y'", "y)"),
    ("param g = per_head(0.9 * a)", {"decl2": "param a = learnable(0.5)"}, "cannot use the parameter 'a'",
     "a)"),
    ("param g = per_head(1 - hed)", {}, "cannot use the name 'hed'", "hed"),
    ("param g = per_head(tanh(head))", {}, "unknown function 'tanh' in per_head", "tanh"),
    ("param g = per_head(min(head))", {}, "min takes 2 arguments, got 1", "min"),
    ("param g = per_head(exp(x=head))", {}, "exp takes positional arguments only", "x="),
    ("param g = per_head(value=head)", {}, "per_head takes one positional expression", "value="),
    ("param g = per_head(head, 1)", {}, "per_head takes one expression", "per_head"),
    ("param g = per_head", {}, "per_head takes one expression", "per_head"),
    ("param g = per_head(if head > 1 then 0.9 else 0.8)", {}, "per_head(...) has no if/else", "if"),
    ("param g = per_head(0.9 / (head - 2))", {}, "division by zero at head 2", "/ (head"),
    ("param g = per_head(log(head - 1))", {}, "log of -1 at head 0", "log("),
    ("param g = per_head(0.5 + head)", {}, "decay alpha must be in (0, 1], not 1.5", "g)"),
    ("param g = per_head(0.9 - 0.5 * head)", {"lr": "g", "retention": "none"}, "gd lr must be > 0, not -0.1",
     "g,"),
    ("param g = per_head(" + " + ".join(["head"] * 120) + ")", {}, "is too long", "head + head"),
    ("param g = gaussian(0.9)", {}, "a param is learnable(INIT[, ACTIVATION]) or per_head(", "gaussian"),
]


@pytest.mark.parametrize("decl,other,message,at", ERRORS, ids=[e[0].removeprefix("param g = ") for e in ERRORS])
def test_errors_are_located(decl, other, message, at):
    decl_all = (other["decl2"] + "\n    " if "decl2" in other else "") + decl
    text = spec(decl_all, retention=other.get("retention", "decay(g)"), lr=other.get("lr", "1"))
    with pytest.raises(SpecError) as info:
        load_spec(text, "p.miras")
    err = info.value
    assert message in str(err), str(err)
    assert re.match(r"p\.miras:\d+:\d+: ", str(err)), str(err)
    line = text.split("\n")[err.line - 1]
    assert (line + "\n")[err.col - 1:].startswith(at), (str(err), line, err.col)


def test_unused_per_head_constant_is_an_error():
    with pytest.raises(SpecError, match="parameter 'h' is declared but not used"):
        load_spec(spec("param g = per_head(0.9)\n    param h = per_head(head)"), "p.miras")


# ---- the RetNet example --------------------------------------------------------------------------

def _decays(H):
    return torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64)


def _retention(q, k, v, gamma):
    """Hand-written per-head-decay linear attention: S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
    out = []
    for t in range(T):
        S = gamma.view(1, H, 1, 1) * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def _qkv(B, T, H, K, V, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    return q, k, torch.randn(B, T, H, V, generator=g, dtype=dtype)


def test_retnet_spec_declares_the_paper_decay(retnet):
    module, compiled = retnet
    p = compiled.ir.spec.param("gamma")
    assert p.kind == "per_head"
    assert module.HEADS != 3
    assert "gamma = 1 - 2^(-5 - head)" in module.__doc__
    assert "gamma = 1 - 2^(-5 - head)" in explain(compiled.ir)
    import inspect
    for fn in (module.memory, module.step):
        assert "gamma" not in inspect.signature(fn).parameters
    assert compiled.ir.inputs() == ()
    assert torch.equal(module._per_head_constants(3, "cpu", torch.float64)["gamma"], _decays(3))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_retnet_equals_per_head_retention(retnet, backend):
    module, _ = retnet
    B, T, H, K, V = 2, 11, 3, 5, 4
    q, k, v = _qkv(B, T, H, K, V)
    o, S = module.memory(q, k, v, backend=backend, chunk_size=4, output_final_state=True)
    o_ref, S_ref = _retention(q, k, v, _decays(H))
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)
    # and not a single decay for every head
    o_flat, _ = _retention(q, k, v, torch.full((H,), 0.96875, dtype=torch.float64))
    assert not torch.allclose(o, o_flat, rtol=1e-6, atol=1e-6)


def test_retnet_triton_agrees_with_torch(retnet):
    pytest.importorskip("triton")
    module, _ = retnet
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, H, K, V = 1, 20, 3, 16, 16
    q, k, v = (x.float().to(device) for x in _qkv(B, T, H, K, V, seed=1))
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o, S = module.memory(*leaves, backend=backend, chunk_size=16, output_final_state=True)
        (o.square().sum() + S.square().sum()).backward()
        results[backend] = (o.detach(), S.detach(), *(x.grad for x in leaves))
    for name, a, b in zip(("o", "S", "dq", "dk", "dv"), results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_retnet_decode_after_prefill_equals_one_call(retnet, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    module, _ = retnet
    dtype = torch.float32 if backend == "triton" else torch.float64
    B, T, H, K, V, C, P = 2, 13, 3, 16, 16, 4, 8
    q, k, v = _qkv(B, T, H, K, V, dtype=dtype, seed=2)
    o_all, _ = module.memory(q, k, v, backend="torch", chunk_size=C)
    _, S = module.memory(q[:, :P], k[:, :P], v[:, :P], backend="torch", chunk_size=C, output_final_state=True)
    state = module.decode_state(S)
    outs = []
    with torch.no_grad():
        for t in range(P, T):
            o, state = module.step(q[:, t], k[:, t], v[:, t], state=state, chunk_size=C, backend=backend)
            outs.append(o)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(torch.stack(outs, 1), o_all[:, P:], rtol=tol, atol=tol)


def test_retnet_block_builds_at_other_heads(retnet):
    module, _ = retnet
    torch.manual_seed(0)
    block = module.RetNet(24, heads=3, key_dim=8, value_dim=8, chunk_size=4, backend="torch").double()
    assert not any("gamma" in n for n, _ in block.named_parameters())
    assert not any("gamma" in n for n, _ in block.named_buffers())
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    y, _ = block(x)
    assert y.shape == (2, 9, 24) and torch.isfinite(y).all()
    # token by token through the block's decode path gives the same outputs
    state, outs = None, []
    for t in range(9):
        o, state = block(x[:, t:t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-10, atol=1e-10)


# ---- other roles: a bias parameter, the learning rate --------------------------------------------

ROLES = {
    "bias_param": spec("param c = per_head(0.5 + 0.25 * head)\n"
                       "    param g = per_head(max(0.9, 1 - 2^(-head)))",
                       bias="sum(c * (y - v)^2) / 2", retention="decay(g)"),
    "lr": spec("param g = per_head(min(0.5, sqrt(0.01 + head) / 4) + exp(-head) / 10)",
               bias="l2", retention="decay(0.95)", lr="g"),
}


@pytest.mark.parametrize("role", list(ROLES))
def test_per_head_constant_in_other_roles(role, tmp_path):
    module, _ = _load(ROLES[role], f"role_{role}", tmp_path)
    B, T, H, K, V = 2, 9, 3, 8, 8
    q, k, v = _qkv(B, T, H, K, V, seed=3)
    o_ref, s_ref = module.memory(q, k, v, backend="reference", output_final_state=True)
    o, s = module.memory(q, k, v, backend="torch", output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    # the constants differ between heads and reach the rule: heads with equal inputs give other outputs
    qs, ks, vs = (x[:, :, :1].expand(-1, -1, H, -1).contiguous() for x in (q, k, v))
    o_same, _ = module.memory(qs, ks, vs, backend="torch")
    assert not torch.allclose(o_same[:, :, 0], o_same[:, :, 1])


MLP_MOMENTUM = """layer PM {
    heads 4
    key_dim 8
    value_dim 8
    memory mlp(depth=2, expansion=2, act=gelu, residual=true, norm=true)
    param g = per_head(1 - 2^(-5 - head))
    param c = per_head(0.5 + 0.25 * head)
    gate theta : head = softplus(rank=4, init=0.05)
    gate beta : head = sigmoid(rank=4, init=0.5)
    bias sum(c * (y - v)^2) / 2
    retention decay(g)
    algorithm momentum(beta=beta, lr=theta, chunk=4)
}
"""


def test_per_head_constants_on_the_mlp_kernels_with_momentum(tmp_path):
    """Per-head constants as the decay and a bias parameter of an MLP memory with momentum: the Triton
    MLP kernels (the interpreter without a GPU) agree with the torch backend, outputs and gradients."""
    pytest.importorskip("triton")
    from conftest import make_state

    module, compiled = _load(MLP_MOMENTUM, "mlp_momentum", tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, H, K, V = 1, 12, 3, 8, 8
    q, k, v = (x.float().to(device) for x in _qkv(B, T, H, K, V, seed=5))
    gen = torch.Generator().manual_seed(5)
    gates = {"theta": 0.02 + 0.05 * torch.rand(B, T, H, generator=gen),
             "beta": 0.3 + 0.4 * torch.rand(B, T, H, generator=gen)}
    s0 = [x.float().to(device) for x in make_state(compiled.ir, B, H, K, V, gen=gen)]
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        gs = {n: x.to(device).requires_grad_(True) for n, x in gates.items()}
        o, _ = module.memory(*leaves, **gs, initial_state=tuple(s0), backend=backend, chunk_size=4)
        o.square().sum().backward()
        results[backend] = (o.detach(), *(x.grad for x in leaves), *(gs[n].grad for n in sorted(gs)))
    names = ("o", "dq", "dk", "dv", "dbeta", "dtheta")
    for name, a, b in zip(names, results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4, msg=name)
