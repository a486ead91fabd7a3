"""The fused triton decode step of MLP memories against the torch step and the reference backend.

Every variant decodes from a random (never zero) state over several tokens that cross chunk ends, so the
base / pos bookkeeping of DecodeState is exercised with the arithmetic. Without a GPU the kernel runs in
Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py): shapes stay small (K, V 8 to 16, expansion
2 or 3; a hidden width of 36 is one full tile of 32 columns and a partial one).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from conftest import (
    CountLaunches,
    closed_state,
    compile_module,
    decode_steps,
    make_inputs,
    make_state,
    prefill_then_steps,
    reference_call,
    rel,
    state_vector,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ETA = "gate eta : head = softplus(rank=4, init=0.1)"
ALPHA = "gate a : head = sigmoid(rank=4, init=0.9)"
BETA = "gate b : head = sigmoid(rank=4, init=0.8)"


@dataclass(frozen=True)
class MlpStepVariant:
    """An MLP-memory layer: a test id, the memory's options, bias, declarations, retention and algorithm
    (spec text), depth, head dims, chunk (read from the algorithm) and the dtype of q, k, v."""

    name: str
    mem: str
    bias: str
    decls: tuple[str, ...]
    retention: str
    algorithm: str
    depth: int = 2
    K: int = 8
    V: int = 8
    dtype: torch.dtype = torch.float32

    @property
    def chunk(self) -> int:
        return int(self.algorithm.split("chunk=")[1].split(",")[0].split(")")[0])

    def spec(self, layer: str) -> str:
        return "\n".join([f"layer {layer} {{", "    heads 2", f"    key_dim {self.K}", f"    value_dim {self.V}",
                          f"    memory mlp(depth={self.depth}, {self.mem}) init learned",
                          *("    " + d for d in self.decls), f"    bias {self.bias}",
                          f"    retention {self.retention}", f"    algorithm {self.algorithm}", "}"])


_v = MlpStepVariant

# depth 1 and 2; residual and LayerNorm on and off; gd and momentum; decay a per-head gate, a learnable,
# a constant or none; at=previous and at=retained; chunk 1 and 4; biases of every class (l2 affine,
# huber / lp nonlinear with per-channel and per-head parameters, dot y-independent); lr per head, per
# channel, learnable or constant; K != V; fp32 and bf16.
VARIANTS = [
    # Titans' memory: silu, residual, momentum with its own gate, decay
    _v("titans_momentum", "expansion=2, act=silu, residual=true, norm=false", "l2", (ETA, ALPHA, BETA), "decay(a)",
       "momentum(beta=b, lr=eta, chunk=4)"),
    # TTT-Linear: depth 1, x + LN(x W), no retention
    _v("ttt_linear_depth1", "residual=true, norm=true", "l2", (ETA,), "none", "gd(lr=eta, chunk=4)", depth=1,
       K=16, V=16),
    # Yaad's Huber mixture bias with a per-head threshold, gelu, residual and LN, chunk 1
    _v("yaad_huber_mix", "expansion=2, act=gelu, residual=true, norm=true", "huber_mix(d)",
       (ETA, ALPHA, "gate d : head = softplus(rank=4, init=1.0)"), "decay(a)", "gd(lr=eta, chunk=1)"),
    # LN without residual, K != V, expansion 3 (a partial hidden tile), per-channel lr and bias parameter
    _v("relu_ln_channel", "expansion=3, act=relu, residual=false, norm=true", "huber(d)",
       ("gate d : channel = softplus(rank=4, init=0.5)", "gate eta : channel = softplus(rank=4, init=0.1)"),
       "none", "gd(lr=eta, chunk=4)", K=12, V=8),
    # depth 1 without residual or LN: momentum with a learnable beta, a constant decay, lp(p=3), chunk 1
    _v("depth1_plain_momentum", "residual=false, norm=false", "lp(p=3)", ("param b = learnable(0.8, sigmoid)",),
       "decay(0.9)", "momentum(beta=b, lr=0.3, chunk=1)", depth=1, K=8, V=12),
    # at=retained with residual and LN in bf16
    _v("tanh_retained_bf16", "expansion=2, act=tanh, residual=true, norm=true", "l2", (ETA, ALPHA), "decay(a)",
       "gd(lr=eta, chunk=4, at=retained)", dtype=torch.bfloat16, K=16, V=16),
    # a y-independent bias (no forward pass), momentum at=retained with a learnable decay, K != V
    _v("dot_momentum_retained", "expansion=2, act=gelu, residual=false, norm=false", "dot",
       ("param a = learnable(0.9, sigmoid)",), "decay(a)", "momentum(beta=0.8, lr=0.2, chunk=4, at=retained)",
       V=12),
    # depth 1 with LN only, momentum at=retained, chunk 1
    _v("depth1_ln_momentum_retained", "residual=false, norm=true", "l2", (ETA, ALPHA, BETA), "decay(a)",
       "momentum(beta=b, lr=eta, chunk=1, at=retained)", depth=1, K=16, V=16),
    # the identity activation, no retention, gd with a constant lr, chunk 4
    _v("identity_no_decay", "expansion=2, act=identity, residual=true, norm=false", "l2", (), "none",
       "gd(lr=0.3, chunk=4)"),
]

# Moneta's lq map (each weight matrix W_l = Z_l / n(Z_l)): norm=chunk (a token inside a chunk reads
# Z' / n(Z_b), the chunk's last its own map(Z')) and norm=token, with decay and without, depth 1 and 2,
# gd and momentum, chunk 1 and 4, q an integer and not.
LQ_VARIANTS = [
    _v("moneta_lq_chunk", "expansion=2, act=gelu, residual=true, norm=true", "lp(p=3)", (ETA, ALPHA),
       "decay(a) + lq(q=4)", "gd(lr=eta, chunk=4)"),
    _v("lq_token_momentum", "expansion=3, act=silu, residual=false, norm=false", "l2", (ETA, BETA),
       "lq(q=3, norm=token)", "momentum(beta=b, lr=eta, chunk=4)", K=12, V=8),
    _v("lq_chunk_depth1_chunk1", "residual=true, norm=true", "l2", (ETA, ALPHA), "decay(a) + lq(q=3)",
       "gd(lr=eta, chunk=1)", depth=1, K=16, V=16),
    _v("lq_token_depth1_q2_5", "residual=false, norm=false", "l2", (ETA,), "lq(q=2.5, norm=token)",
       "gd(lr=eta, chunk=4)", depth=1, V=12),
]
# The kl (key axis), bregman and elastic_net maps: W_l = map(Z_l) at the base and in the read-out; a hidden
# width of 36 puts W_2's rows in two tiles, which kl's softmax over them spans (online sums); a kl scale;
# momentum and at=retained; the elastic net's threshold a learnable, a constant and a per-token gate, with
# form=retain (a chunk's last token carries S_gamma(Z')); depth 1 and 2, chunk 1 and 4. Bregman without
# the LayerNorm: sigmoid weights are all positive, and with the LN the torch step alone is 1.2e-4 from
# float64 on W_1 (fp32 rounding, not the kernel's).
MAP_VARIANTS = [
    _v("memora_kl_two_tiles", "expansion=3, act=gelu, residual=true, norm=true", "l2", (ETA, ALPHA),
       "decay(a) + kl(axis=key)", "gd(lr=eta, chunk=4)", K=12, V=12),
    _v("kl_scale_momentum_retained", "expansion=3, act=silu, residual=false, norm=false", "l2", (ETA, ALPHA, BETA),
       "decay(a) + kl(axis=key, scale=2)", "momentum(beta=b, lr=eta, chunk=4, at=retained)", K=12, V=8),
    _v("kl_depth1_chunk1", "residual=true, norm=true", "l2", (ETA,), "kl(axis=key)", "gd(lr=eta, chunk=1)",
       depth=1, K=16, V=16),
    _v("bregman_two_tiles", "expansion=3, act=gelu, residual=true, norm=false", "l2", (ETA, ALPHA),
       "decay(a) + bregman(sigmoid)", "gd(lr=eta, chunk=4)", K=12, V=12),
    _v("elastic_ftrl_learnable", "expansion=2, act=gelu, residual=true, norm=true", "l2",
       (ETA, "param g = learnable(0.05, softplus)"), "elastic_net(gamma=g, form=ftrl)", "gd(lr=eta, chunk=4)"),
    _v("elastic_retain_gate_two_tiles", "expansion=3, act=silu, residual=true, norm=false", "l2",
       (ETA, ALPHA, "gate g : head = softplus(rank=4, init=0.02)"), "decay(a) + elastic_net(gamma=g, form=retain)",
       "gd(lr=eta, chunk=4)", K=12, V=12),
    _v("elastic_retain_depth1_momentum", "residual=true, norm=true", "l2", (ETA, BETA),
       "elastic_net(gamma=0.01, form=retain)", "momentum(beta=b, lr=eta, chunk=4)", depth=1, K=16, V=16),
]
VARIANTS = VARIANTS + LQ_VARIANTS + MAP_VARIANTS
IDS = [v.name for v in VARIANTS]


def _compile(i, variant, tmp_path):
    module, compiled = compile_module(variant.spec(f"StepMlp{i}"), f"step_mlp{i}.miras", tmp_path,
                                      f"_step_mlp{i}")
    assert hasattr(module, "_step_kernel"), "the variant has no fused step kernel"
    return module, compiled.ir


def _inputs(ir, variant, B, T, H, seed):
    """Inputs in the run's dtype and their float64 images (the values it sees exactly), and a random
    fp32 state (weights, then momenta)."""
    K, V = variant.K, variant.V
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=seed)
    low = [x.to(variant.dtype).to(DEVICE) for x in (q, k, v, *params.values())]
    s0 = tuple(x.float().to(DEVICE) for x in make_state(ir, B, H, K, V, gen=gen))
    return low[:3], dict(zip(params, low[3:])), s0




@pytest.mark.parametrize(("i", "variant"), list(enumerate(VARIANTS)), ids=IDS)
def test_triton_step_matches_torch_step_and_reference(i, variant, tmp_path, monkeypatch):
    chunk = variant.chunk
    module, ir = _compile(i, variant, tmp_path)
    counter = CountLaunches(module._step_kernel)
    monkeypatch.setattr(module, "_step_kernel", counter)
    B, H = 2, 2
    T = chunk + 6 if chunk > 1 else 7  # crosses chunk ends, ends inside a chunk where chunk > 1
    qkv, params, s0 = _inputs(ir, variant, B, T, H, seed=4000 + i)

    o_tr, st_tr = decode_steps(module, qkv, params, module.decode_state(s0), chunk, "triton", 0, T)
    assert counter.launches == T, "step(backend='triton') did not run the fused kernel for every token"
    o_to, st_to = decode_steps(module, qkv, params, module.decode_state(s0), chunk, "torch", 0, T)
    assert counter.launches == T
    o_ref, s_ref = reference_call(module, qkv, params, s0, chunk)

    # Triton and torch steps: the same rule in float32, only summation order differs.
    # The LayerNorm amplifies rounding where a row's variance is small: on yaad_huber_mix (chunk 1) the
    # two float32 steps differ by 1.5e-5 while the torch step alone is 5e-6 from the float64 reference.
    o_tol = 5e-5 if variant.dtype == torch.float32 else 1e-2  # bf16 outputs: 8 bits
    assert rel(o_tr, o_to) < o_tol, f"o vs torch step: {rel(o_tr, o_to):.2e}"
    assert st_tr.pos == st_to.pos == T % chunk
    assert isinstance(st_tr.state, tuple) and len(st_tr.state) == len(st_to.state) == len(s0)
    assert isinstance(st_tr.base, tuple) and len(st_tr.base) == len(st_to.base) == variant.depth
    assert all(x.dtype == torch.float32 for x in (*st_tr.state, *st_tr.base))
    for what, a, b in (("state", st_tr.state, st_to.state), ("base", st_tr.base, st_to.base)):
        for n, (x, y) in enumerate(zip(a, b)):
            assert x.shape == y.shape and rel(x, y) < 5e-5, f"{what}[{n}] vs torch step: {rel(x, y):.2e}"
    # Against the oracle: the whole sequence as one memory() call, float64.
    o_tol = 1e-4 if variant.dtype == torch.float32 else 1e-2
    assert torch.isfinite(o_tr).all() and torch.isfinite(state_vector(st_tr.state)).all()
    assert rel(o_tr, o_ref) < o_tol, f"o vs reference: {rel(o_tr, o_ref):.2e}"
    s_tr = state_vector(closed_state(ir, st_tr, params))
    assert rel(s_tr, state_vector(s_ref)) < 1e-4, f"final state vs reference: {rel(s_tr, state_vector(s_ref)):.2e}"
    assert rel(state_vector(s_ref), state_vector(s0)) > 1e-2, "the state barely moved: the comparison could not fail"


@pytest.mark.parametrize(("i", "variant"), list(enumerate(VARIANTS)), ids=IDS)
def test_prefill_then_triton_steps_equals_one_call(i, variant, tmp_path):
    chunk = variant.chunk
    module, ir = _compile(i, variant, tmp_path)
    B, H = 2, 2
    P = 2 * chunk if chunk > 1 else 4  # the prefill: whole chunks
    T = P + chunk + 3 if chunk > 1 else P + 5
    qkv, params, s0 = _inputs(ir, variant, B, T, H, seed=5000 + i)
    with torch.no_grad():
        o_pre, o_dec, state = prefill_then_steps(module, qkv, params, s0, chunk, P, T)
    o_ref, s_ref = reference_call(module, qkv, params, s0, chunk)
    tol = 1e-4 if variant.dtype == torch.float32 else 1e-2
    assert rel(o_pre, o_ref[:, :P]) < tol, f"prefill: {rel(o_pre, o_ref[:, :P]):.2e}"
    assert rel(o_dec, o_ref[:, P:]) < tol, f"decoded tokens: {rel(o_dec, o_ref[:, P:]):.2e}"
    s_dec = state_vector(closed_state(ir, state, params))
    assert rel(s_dec, state_vector(s_ref)) < 1e-4, f"final state: {rel(s_dec, state_vector(s_ref)):.2e}"


def test_auto_and_refusals(tmp_path, monkeypatch):
    """auto takes the kernel without a recorded gradient, the torch step with one; backend='triton'
    refuses float64 and gradients; strided inputs are copied, not misread."""
    module, ir = _compile(0, VARIANTS[0], tmp_path)
    counter = CountLaunches(module._step_kernel)
    monkeypatch.setattr(module, "_step_kernel", counter)
    (q, k, v), params, s0 = _inputs(ir, VARIANTS[0], 2, 1, 2, seed=9)
    tok = {n: (p if p.dim() == 1 else p[:, 0]) for n, p in params.items()}
    state = module.decode_state(s0)
    o, _ = module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state)
    assert counter.launches == 1
    o_torch, _ = module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state, backend="torch")
    assert counter.launches == 1 and rel(o, o_torch) < 1e-5
    qt = q[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    assert qt.stride(-1) != 1
    o_strided, _ = module.step(qt, k[:, 0], v[:, 0], **tok, state=state, backend="triton")
    assert rel(o_strided, o_torch) < 1e-5
    w = s0[1].clone().requires_grad_()  # a weight that records a gradient: auto takes the torch step
    o_grad, _ = module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state._replace(state=(s0[0], w, *s0[2:])))
    assert counter.launches == 2 and o_grad.requires_grad
    with pytest.raises(ValueError, match="no backward"):
        module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state._replace(state=(s0[0], w, *s0[2:])),
                    backend="triton")
    with pytest.raises(ValueError, match="float64"):
        module.step(q[:, 0].double(), k[:, 0].double(), v[:, 0].double(), **{n: p.double() for n, p in tok.items()},
                    state=state, backend="triton")
    with pytest.raises(ValueError, match=r"state.base\[1\] must have shape"):
        module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state._replace(base=(s0[0], s0[0])), backend="triton")
    assert counter.launches == 2


def test_a_module_with_both_kernel_families_defines_each_helper_once(compiled_examples, tmp_path):
    """Moneta with lq(norm=token) has the MLP chunk kernels and the step: the library functions both
    call (_lq_pow, the activation, _bias_grad) are pasted once."""
    from conftest import ROOT

    from mirasc.compiler import compile_spec

    text = (ROOT / "examples" / "moneta.miras").read_text().replace("lq(q=4)", "lq(q=4, norm=token)")
    source = compile_spec(text, "moneta_token.miras").source
    for name in ("_lq_pow", "_tl_act", "_bias_grad", "_step_lq_r", "_step_kernel", "_mlp_fwd_kernel"):
        assert source.count(f"def {name}(") == 1, name
