"""The triton backend of MLP memories (fused chunked kernels) against the reference backend.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py), so CI checks the very kernels a GPU runs, at small shapes: the reference runs in float64,
the kernels in float32 (or bf16 inputs), on ragged sequences (T not a multiple of the chunk). Every
comparison checks the outputs, the final state and the gradients of q, k, v, every gate and learnable
and every initial-state tensor (the weights, and the momentum buffers with momentum).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from conftest import ROOT, compile_module, flatten_state, layer_dims, make_inputs, make_state, rel

from mirasc.compiler import compile_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 2000
ETA = "gate eta : head = softplus(rank=4, init=0.1)"
ALPHA = "gate alpha : head = sigmoid(rank=4, init=0.9)"
BETA = "gate b : head = sigmoid(rank=4, init=0.9)"


@dataclass(frozen=True)
class MlpVariant:
    """An MLP-memory layer: the memory's options (after depth), its bias, declarations, retention and
    algorithm (spec text), head dims, sequence length, depth, dtype of q, k, v and batch size."""

    mem: str
    bias: str
    decls: tuple[str, ...]
    retention: str
    algorithm: str
    K: int = 16
    V: int = 16
    T: int = 40
    depth: int = 2
    dtype: torch.dtype = torch.float32
    B: int = 1

    def __post_init__(self):
        object.__setattr__(self, "decls", tuple(self.decls))

    def spec(self, name: str) -> str:
        return "\n".join([f"layer Mlp_{name} {{", "    heads 2", f"    key_dim {self.K}", f"    value_dim {self.V}",
                          f"    memory mlp(depth={self.depth}, {self.mem}) init learned",
                          *("    " + d for d in self.decls), f"    bias {self.bias}",
                          f"    retention {self.retention}", f"    algorithm {self.algorithm}", "}"])


_v = MlpVariant  # short, for the table below


VARIANTS = {
    # Titans' memory (silu, residual, no LN, l2, decay) with plain gd
    "titans_gd": _v("expansion=4, act=silu, residual=true, norm=false", "l2", [ETA, ALPHA], "decay(alpha)",
                    "gd(lr=eta, chunk=16)"),
    # Moneta's memory and bias (gelu, residual, LN, lp(3)) with plain decay
    "moneta_decay": _v("expansion=4, act=gelu, residual=true, norm=true", "lp(p=3)", [ETA, ALPHA], "decay(alpha)",
                       "gd(lr=eta, chunk=16)"),
    # the robust bias (Eq. 17) with head dims that are not powers of two (padded tiles)
    "robust_k20": _v("expansion=2, act=gelu, residual=true, norm=true", "robust(0.5)", [ETA, ALPHA],
                     "decay(alpha)", "gd(lr=eta, chunk=16)", K=20, V=20),
    # per-channel lr and a per-channel bias parameter, no residual (K != V), no retention
    "relu_channel": _v("expansion=2, act=relu, residual=false, norm=true", "huber(d)",
                       ["gate d : channel = softplus(rank=4, init=0.5)",
                        "gate eta : channel = softplus(rank=4, init=0.1)"], "none", "gd(lr=eta, chunk=16)", V=8),
    # a user bias with a learnable scale, a learnable decay (summed over a batch of 2), a constant lr,
    # chunk 32, expansion 3
    "tanh_cauchy": _v("expansion=3, act=tanh, residual=false, norm=false", "sum(log(1 + ((y - v) / c)^2))",
                      ["param c = learnable(1.0, softplus)", "param a = learnable(0.9, sigmoid)"], "decay(a)",
                      "gd(lr=0.3, chunk=32)", V=24, T=45, B=2),
    # a y-independent bias, expansion 1, chunk 64 with a partial second chunk
    "identity_dot": _v("expansion=1, act=identity, residual=true, norm=true", "dot", [ETA, ALPHA], "decay(alpha)",
                       "gd(lr=eta, chunk=64)", T=80),
    # bf16 inputs (the state stays fp32)
    "silu_bf16": _v("expansion=4, act=silu, residual=true, norm=true", "l2", [ETA, ALPHA], "decay(alpha)",
                    "gd(lr=eta, chunk=16)", dtype=torch.bfloat16),
    # depth 1: a plain matrix layer x W with the residual and the LayerNorm
    "depth1_ln": _v("expansion=1, act=gelu, residual=true, norm=true", "l2", [ETA, ALPHA], "decay(alpha)",
                    "gd(lr=eta, chunk=16)", depth=1, B=2),
    # depth 3 with momentum (its own gate) and decay
    "depth3_momentum": _v("expansion=2, act=silu, residual=true, norm=false", "l2", [ETA, ALPHA, BETA],
                          "decay(alpha)", "momentum(beta=b, lr=eta, chunk=16)", depth=3),
    # depth 4, K != V, per-channel lr, chunk 8 (tiles of 16 rows, 8 valid)
    "depth4_chunk8": _v("expansion=1, act=relu, residual=false, norm=true", "huber(d)",
                        ["gate d : channel = softplus(rank=4, init=0.5)",
                         "gate eta : channel = softplus(rank=4, init=0.1)", ALPHA], "decay(alpha)",
                        "gd(lr=eta, chunk=8)", V=8, T=21, depth=4),
    # chunk 1 (the exact online rule) with at=retained
    "chunk1_retained": _v("expansion=1, act=gelu, residual=true, norm=true", "l2", [ETA, ALPHA], "decay(alpha)",
                          "gd(lr=eta, chunk=1, at=retained)", T=6),
    # chunk 2, momentum without decay (constants: a small lr keeps the undecayed memory bounded)
    "chunk2_momentum": _v("expansion=2, act=tanh, residual=true, norm=false", "l2", [], "none",
                          "momentum(beta=0.8, lr=0.05, chunk=2)", T=9),
    # Moneta's lq map without decay, q = 3, depth 3, chunk 4
    "lq3_depth3_chunk4": _v("expansion=1, act=gelu, residual=true, norm=true", "lp(p=3)", [ETA], "lq(q=3, norm=token)",
                            "gd(lr=eta, chunk=4)", T=13, depth=3),
    # momentum and at=retained in bf16
    "momentum_retained_bf16": _v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA, ALPHA, BETA],
                                 "decay(alpha)", "momentum(beta=b, lr=eta, chunk=16, at=retained)",
                                 dtype=torch.bfloat16),
}


# lq(norm=chunk), the default (docs/semantics.md, "Decision, Moneta"): a token reads through its chunk's
# base norm, a whole chunk's last token through its own state's. q = 3 and 4, depth 1 and 2, with and
# without decay, gd and momentum, chunks 1, 16 and 64 with partial last chunks, and packed sequences
# (cu_seqlens: the chunk ends are per sequence; a sequence of exactly one chunk ends on a chunk end).
LQ_CHUNK_CASES = {
    "q4_depth2_decay_gd_c16": (_v("expansion=4, act=gelu, residual=true, norm=true", "lp(p=3)", [ETA, ALPHA],
                                  "decay(alpha) + lq(q=4)", "gd(lr=eta, chunk=16)"), None),
    "q4_depth2_decay_momentum_c16": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA, ALPHA, BETA],
                                        "decay(alpha) + lq(q=4)", "momentum(beta=b, lr=eta, chunk=16)"),
                                     [0, 16, 19, 40]),
    "q4_depth2_gd_c64": (_v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA], "lq(q=4)",
                            "gd(lr=eta, chunk=64)", T=80), None),
    "q4_depth1_decay_gd_c64": (_v("expansion=1, act=gelu, residual=true, norm=true", "lp(p=3)", [ETA, ALPHA],
                                  "decay(alpha) + lq(q=4)", "gd(lr=eta, chunk=64)", depth=1), [0, 64, 70, 82]),
    "q4_depth1_momentum_c16": (_v("expansion=1, act=gelu, residual=true, norm=true", "l2", [ETA, BETA], "lq(q=4)",
                                  "momentum(beta=b, lr=eta, chunk=16)", T=37, depth=1, B=2), None),
    "q3_depth1_gd_c1": (_v("expansion=1, act=gelu, residual=true, norm=true", "l2", [ETA], "lq(q=3)",
                           "gd(lr=eta, chunk=1)", T=6, depth=1), None),
    "q3_depth2_decay_gd_c1": (_v("expansion=2, act=tanh, residual=true, norm=true", "l2", [ETA, ALPHA],
                                 "decay(alpha) + lq(q=3)", "gd(lr=eta, chunk=1)"), [0, 3, 7]),
    "q3_depth2_decay_gd_c16": (_v("expansion=2, act=gelu, residual=true, norm=true", "lp(p=3)", [ETA, ALPHA],
                                  "decay(alpha) + lq(q=3)", "gd(lr=eta, chunk=16)"), [0, 5, 21, 48]),
    "q3_depth2_momentum_c64": (_v("expansion=2, act=silu, residual=false, norm=false", "l2", [ETA, BETA],
                                  "lq(q=3)", "momentum(beta=b, lr=eta, chunk=64)", T=80), None),
}


def _compile(name, variant, tmp_path):
    return compile_module(variant.spec(name), f"{name}.miras", tmp_path, f"_mlp_{name}")


def _moneta_token_text() -> str:
    return (ROOT / "examples" / "moneta.miras").read_text().replace("lq(q=4)", "lq(q=4, norm=token)")


def _example(compiled_examples, name, tmp_path):
    """An example's (module, ir); moneta_token: Moneta with lq(norm=token) (the example uses norm=chunk)."""
    if name != "moneta_token":
        return compiled_examples[name]
    module, compiled = compile_module(_moneta_token_text(), "moneta_token.miras", tmp_path, "_mlp_moneta_token")
    return module, compiled.ir


def _returned_nones(source: str) -> tuple[list[str], set[str]]:
    """The calls of a module's functions that pass None for an argument which the callee returns (alone
    or in a tuple), and the names of the functions that return arguments. Triton 3.6 can neither build a
    tuple holding None nor bind None to a name: such a kernel fails to compile on a GPU, while the
    interpreter and later Triton accept it."""
    tree = ast.parse(source)
    returned = {}  # function -> {position: name} of the parameters that it returns
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            rets = [r.value for r in ast.walk(fn) if isinstance(r, ast.Return)]
            names = {e.id for v in rets for e in (v.elts if isinstance(v, ast.Tuple) else [v])
                     if isinstance(e, ast.Name)}
            if params := {i: a.arg for i, a in enumerate(fn.args.args) if a.arg in names}:
                returned[fn.name] = params
    bad = []
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in returned:
            kw = {k.arg: k.value for k in call.keywords}
            for i, name in returned[call.func.id].items():
                arg = call.args[i] if i < len(call.args) else kw.get(name)
                if isinstance(arg, ast.Constant) and arg.value is None:
                    bad.append(f"line {call.lineno}: {call.func.id}(..., {name}=None, ...)")
    return bad, set(returned)


@pytest.mark.parametrize("name", [*VARIANTS, *LQ_CHUNK_CASES, "titans", "moneta", "moneta_token", "yaad",
                                  "ttt_linear"])
def test_no_none_returned(name):
    """The MLP kernels pass a placeholder, never None, for a running sum that does not apply and that a
    helper returns (docs/kernels-mlp.md): checked on the generated source, without a GPU."""
    if name in VARIANTS or name in LQ_CHUNK_CASES:
        text = (VARIANTS.get(name) or LQ_CHUNK_CASES[name][0]).spec(name)
    elif name == "moneta_token":
        text = _moneta_token_text()
    else:
        text = (ROOT / "examples" / f"{name}.miras").read_text()
    compiled = compile_spec(text, f"{name}.miras")
    assert "_mlp_bwd_kernel" in compiled.source
    bad, checked = _returned_nones(compiled.source)
    assert {"_readout_layer_vjp", "_weight_grad_layer", "_layer_vjp"} <= checked  # it sees the helpers
    assert not bad, "\n".join(bad)


def _run(module, backend, dtype, chunk, q, k, v, params, s0, w_o, w_s, cu_seqlens=None):
    """memory() on fresh leaves (state and parameters in fp32 unless the run is float64) and one backward
    of a random linear function of the output and the final state."""
    low = torch.float32 if dtype != torch.float64 else dtype
    leaves = [x.to(DEVICE, dtype if i < 3 else low).detach().requires_grad_()
              for i, x in enumerate([q, k, v, *params.values(), *s0])]
    p = dict(zip(params, leaves[3:3 + len(params)]))
    o, final = module.memory(*leaves[:3], **p, initial_state=tuple(leaves[3 + len(params):]),
                             output_final_state=True, chunk_size=chunk, backend=backend,
                             cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(DEVICE))
    loss = (o.double() * w_o.to(DEVICE)).sum() + sum((s.double() * w.to(DEVICE)).sum() for s, w in zip(final, w_s))
    loss.backward()
    return [o, *final], leaves


def _compare(module, ir, dtype, chunk, B, H, K, V, T, seed, scale=None, tol=None, cu_seqlens=None):
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=seed)
    params = {n: x * (scale or {}).get(n, 1.0) for n, x in params.items()}
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # values the low-precision run sees exactly
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    s0 = flatten_state(make_state(ir, N, H, K, V, gen=gen))  # weights (and momentum buffers), never zeros
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = [torch.randn(s.shape, dtype=torch.float64, generator=gen) for s in s0]
    outs, leaves = _run(module, "triton", dtype, chunk, q, k, v, params, s0, w_o, w_s, cu_seqlens)
    ref_outs, ref_leaves = _run(module, "reference", torch.float64, chunk, q, k, v, params, s0, w_o, w_s,
                                cu_seqlens)
    tol = tol or (2e-4 if dtype == torch.float32 else 2e-2)
    n = len(layer_dims(ir, K, V))
    states = [f"W{i + 1}" for i in range(n)] + [f"m{i + 1}" for i in range(len(s0) - n)]
    for what, a, b in zip(["o", *(f"final {s}" for s in states)], outs, ref_outs, strict=True):
        assert torch.isfinite(a).all(), what
        assert rel(a, b) < tol, f"{what}: relative error {rel(a, b):.2e}"
    names = ["q", "k", "v", *params, *(f"initial {s}" for s in states)]
    for what, a, b in zip(names, leaves, ref_leaves, strict=True):
        assert a.grad is not None and torch.isfinite(a.grad).all(), f"d{what}"
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert rel(a.grad, b.grad) < tol, f"d{what}: relative error {rel(a.grad, b.grad):.2e}"


def _chunk(compiled) -> int:
    return compiled.ir.algorithm.chunk


@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_mlp_matches_reference(name, tmp_path):
    variant = VARIANTS[name]
    module, compiled = _compile(name, variant, tmp_path)
    assert "_mlp_bwd_kernel" in compiled.source
    K, V, T = variant.K, variant.V, variant.T
    # the Cauchy scale c drawn in (0.5, 5): a tiny c makes the loss (and its gradients ~1/c^3) ill-conditioned
    _compare(module, compiled.ir, variant.dtype, _chunk(compiled), variant.B, 2, K, V, T,
             seed=SEED + list(VARIANTS).index(name), scale={"c": 10.0})


@pytest.mark.parametrize("name", list(LQ_CHUNK_CASES))
def test_lq_chunk_matches_reference(name, tmp_path):
    """lq(norm=chunk) on the kernels: outputs, final states and every gradient against the reference."""
    variant, cu = LQ_CHUNK_CASES[name]
    module, compiled = _compile(name, variant, tmp_path)
    assert "_mlp_bwd_kernel" in compiled.source and "def _lq_chunk_end" in compiled.source
    T = variant.T if cu is None else cu[-1]
    _compare(module, compiled.ir, variant.dtype, _chunk(compiled), variant.B if cu is None else 1, 2, variant.K,
             variant.V, T, seed=SEED + 400 + list(LQ_CHUNK_CASES).index(name),
             cu_seqlens=None if cu is None else torch.tensor(cu))


def _split_heads(module, K: int, V: int, chunk: int) -> None:
    """Both kernels split each head over programs of 16 hidden columns (the small test heads have 32-64),
    and the launch really splits."""
    for attr in ("_MLP_FWD_CONFIG", "_MLP_BWD_CONFIG"):
        setattr(module, attr, {**getattr(module, attr), "XS": 16})
        assert module._mlp_launch(K, V, chunk, getattr(module, attr))["NS"] > 1, attr


@pytest.mark.skipif(DEVICE != "cuda", reason="a head's programs wait for each other, which needs a GPU: Triton's "
                    "interpreter runs one program at a time (there every head is one program)")
@pytest.mark.parametrize("name", ["titans_gd", "moneta_decay", "tanh_cauchy", "relu_channel", "silu_bf16",
                                  "chunk2_momentum", "momentum_retained_bf16"])
def test_triton_mlp_sliced_heads_match_reference(name, tmp_path):
    """Each head split over several programs by hidden columns (16 per program here), which sum their
    parts of the last layer's products through _head_sum: the same checks as above."""
    variant = VARIANTS[name]
    module, compiled = _compile(name, variant, tmp_path)
    K, V = variant.K, variant.V
    _split_heads(module, K, V, _chunk(compiled))
    _compare(module, compiled.ir, variant.dtype, _chunk(compiled), variant.B, 2, K, V, variant.T,
             seed=SEED + 100 + list(VARIANTS).index(name), scale={"c": 10.0})


@pytest.mark.parametrize("name, cu", [
    ("tanh_cauchy", [0, 5, 37, 38, 45]),  # chunk 32: a sequence under a chunk, one over, one of a token
    ("moneta_decay", [0, 16, 19, 40]),  # chunk 16: a sequence of exactly one chunk, LN and residual
])
def test_packed_sequences_in_one_launch(name, cu, tmp_path):
    """cu_seqlens on the kernels (one launch for all sequences) against the reference, sequence by
    sequence: the learnable parameters' gradients sum over the sequences, each has its own state."""
    variant = VARIANTS[name]
    module, compiled = _compile(name, variant, tmp_path)
    _compare(module, compiled.ir, variant.dtype, _chunk(compiled), 1, 2, variant.K, variant.V, cu[-1],
             seed=SEED + 200 + len(cu), scale={"c": 10.0}, cu_seqlens=torch.tensor(cu))


@pytest.mark.skipif(DEVICE != "cuda", reason="split heads need a GPU (see above)")
def test_sliced_heads_on_packed_sequences(tmp_path):
    """Split heads (16 hidden columns per program) over packed sequences of uneven lengths."""
    variant = VARIANTS["moneta_decay"]
    module, compiled = _compile("moneta_decay", variant, tmp_path)
    _split_heads(module, variant.K, variant.V, _chunk(compiled))
    cu = [0, 3, 35, 40, 77]
    _compare(module, compiled.ir, variant.dtype, _chunk(compiled), 1, 2, variant.K, variant.V, cu[-1],
             seed=SEED + 300, cu_seqlens=torch.tensor(cu))


@pytest.mark.parametrize("delta_scale", [20.0, 1.0])
def test_yaad_example_on_the_kernels(compiled_examples, delta_scale):
    """examples/yaad.miras as shipped (small head dims: memory() takes them from the inputs).

    With a large threshold every token takes the l2 branch; with the drawn one most take the smoothed
    l1 branch, whose second derivative reaches 1/sqrt(eps) = 1e3 near e_j = 0 and turns fp32 rounding
    into ~1e-3 relative differences of the gradients: a looser tolerance there.
    """
    module, ir = compiled_examples["yaad"]
    _compare(module, ir, torch.float32, 16, 1, 2, 16, 16, 40, seed=7, scale={"delta": delta_scale},
             tol=2e-4 if delta_scale > 1 else 1e-2)


@pytest.mark.parametrize("example, chunk, T, dtype", [
    ("moneta", 16, 40, torch.float32),  # decay + lq(q=4), norm=chunk: a chunk's base norm, its end's own
    ("moneta_token", 16, 40, torch.float32),  # lq(q=4, norm=token): the norm of every token's own state
    ("titans", 16, 40, torch.float32),  # momentum with decay
    ("titans", 64, 70, torch.bfloat16),  # its own chunk size, a ragged second chunk, bf16 inputs
    ("ttt_linear", 16, 40, torch.float32),  # depth 1: x + LN(x W)
])
def test_examples_on_the_kernels(compiled_examples, example, chunk, T, dtype, tmp_path):
    """examples/moneta.miras (and its lq(norm=token) variant), titans and ttt_linear at small head dims."""
    module, ir = _example(compiled_examples, example, tmp_path)
    _compare(module, ir, dtype, chunk, 1, 2, 16, 16, T, seed=11)


def test_packed_sequences_on_the_kernels(compiled_examples):
    """cu_seqlens: packed sequences, each from its own state (momentum buffers included)."""
    module, ir = compiled_examples["titans"]
    _compare(module, ir, torch.float32, 8, 1, 2, 16, 16, 22, seed=13, cu_seqlens=torch.tensor([0, 11, 14, 22]))


@pytest.mark.parametrize("source", ["moneta_decay", "moneta", "moneta_token", "titans"])
def test_prefill_then_decode(source, compiled_examples, tmp_path):
    """A triton prefill's final state continues exactly under step() (the torch decode path)."""
    if source not in VARIANTS:
        module, ir = _example(compiled_examples, source, tmp_path)
    else:
        module, compiled = _compile(f"decode_{source}", VARIANTS[source], tmp_path)
        ir = compiled.ir
    B, H, K, V, P, T = 1, 2, 16, 16, 32, 37
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float32, seed=5)
    s0 = tuple(s.float().to(DEVICE) for s in flatten_state(make_state(ir, B, H, K, V, gen=gen)))
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    params = {n: p.to(DEVICE) for n, p in params.items()}
    with torch.no_grad():
        o_full, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=16, backend="reference")
        pre = {n: p if p.dim() == 1 else p[:, :P] for n, p in params.items()}
        o_pre, s = module.memory(q[:, :P], k[:, :P], v[:, :P], **pre, initial_state=s0, output_final_state=True,
                                 chunk_size=16, backend="triton")
        assert rel(o_pre, o_full[:, :P]) < 1e-4
        state = module.decode_state(s)
        for t in range(P, T):
            o_t, state = module.step(q[:, t], k[:, t], v[:, t],
                                     **{n: p if p.dim() == 1 else p[:, t] for n, p in params.items()},
                                     state=state, chunk_size=16)
            assert rel(o_t, o_full[:, t]) < 1e-4, t


def test_block_with_learned_initial_state(compiled_examples):
    """The Titans block (learned W_0, conv, gates): triton == reference for the output and the gradient
    of every parameter, the learned initial weights included; the tokens after the last whole chunk
    run through step()."""
    module, _ = compiled_examples["titans"]
    torch.manual_seed(0)
    ref = module.Titans(32, heads=2, key_dim=16, value_dim=16, chunk_size=16, backend="reference").double()
    tri = module.Titans(32, heads=2, key_dim=16, value_dim=16, chunk_size=16, backend="triton")
    tri.load_state_dict({n: p.float() for n, p in ref.state_dict().items()})
    ref, tri = ref.to(DEVICE), tri.to(DEVICE)
    x = torch.randn(1, 35, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w = torch.randn(1, 35, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (ref(x)[0] * w).sum().backward()
    y_tri = tri(x.float())[0]
    (y_tri.double() * w).sum().backward()
    assert rel(y_tri, ref(x)[0]) < 2e-4
    grads = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        assert grads[name].grad.abs().sum() > 0, name
        assert rel(p.grad, grads[name].grad) < 2e-4, f"d{name}: relative error {rel(p.grad, grads[name].grad):.2e}"
    assert any(n.startswith("initial_weights") for n in grads)


def test_triton_mlp_runtime_refusals(tmp_path):
    module, compiled = _compile("refuse", VARIANTS["titans_gd"], tmp_path)
    q, k, v, params, gen = make_inputs(compiled.ir, 1, 8, 2, 16, 16, dtype=torch.float32)
    s0 = tuple(s.float() for s in flatten_state(make_state(compiled.ir, 1, 2, 16, 16, gen=gen)))
    with pytest.raises(ValueError, match="1 <= chunk_size <= 64"):
        module.memory(q, k, v, **params, initial_state=s0, chunk_size=128, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        module.memory(q.double(), k.double(), v.double(), **params, initial_state=s0, chunk_size=16,
                      backend="triton")
    # backend="auto" keeps MLP memories on torch (the kernels are opt-in until checked on a GPU)
    for chunk in (16, 128):
        o_auto, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=chunk)
        o_torch, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=chunk, backend="torch")
        assert torch.equal(o_auto, o_torch)


@pytest.mark.parametrize("example, split_forward", [("moneta", False), ("yaad", True), ("titans", False)])
def test_covered_examples_carry_the_kernels(example, split_forward):
    """Every covered example has the backward kernel; gd on a depth-2 memory without lq (Yaad) runs its
    forward as the writes and the read-out, lq (Moneta) and momentum (Titans) as one fused kernel."""
    text = (ROOT / "examples" / f"{example}.miras").read_text()
    compiled = compile_spec(text, f"{example}.miras")
    assert "_mlp_bwd_kernel" in compiled.source
    assert ("def _mlp_write_kernel" in compiled.source) == split_forward
    assert ("def _mlp_read_kernel" in compiled.source) == split_forward
    assert ("def _mlp_fwd_kernel" in compiled.source) != split_forward


@pytest.mark.parametrize("retention, algorithm, why", [
    ("lq(q=1.5)", "gd(lr=eta, chunk=16)", "lq retention with q < 2 has no triton kernel"),
    ("decay(0.9) + lq(q=4, norm=token)", "gd(lr=eta, chunk=16, at=retained)",
     "at=retained with a non-identity retention map has no triton kernel"),
])
def test_uncovered_specs_fall_back_to_torch(retention, algorithm, why, tmp_path):
    variant = _v("expansion=2, act=gelu, residual=true, norm=true", "l2", [ETA], retention, algorithm)
    module, compiled = _compile(f"fallback{abs(hash(retention + algorithm))}", variant, tmp_path)
    assert "_mlp_bwd_kernel" not in compiled.source
    ir = compiled.ir
    q, k, v, params, gen = make_inputs(ir, 1, 20, 2, 16, 16, dtype=torch.float32, seed=3)
    s0 = make_state(ir, 1, 2, 16, 16, dtype=torch.float32, gen=gen)
    with pytest.raises(NotImplementedError, match=why):
        module.memory(q, k, v, **params, initial_state=s0, chunk_size=16, backend="triton")
    o_auto, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=16)
    o_torch, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=16, backend="torch")
    assert torch.equal(o_auto, o_torch)
