"""A non-finite input never reaches an earlier token, another sequence, another packed sequence or
another head, on any backend (the token-by-token rule's causality, for nan and inf as for numbers)."""
from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE_NAMES, ROOT, import_source, make_inputs, make_state, stable_seed

from mirasc.compiler import compile_spec

T, BAD = 40, 29  # token BAD is in the middle of a 16-token tile and of a chunk


def _run(module, ir, backend, where, value, chunk, cu_seqlens=None, B=2):
    """memory() on fresh inputs with `value` put into input `where` at row 0, token BAD, head 0 (a
    learnable [H]: head 0); value None: the same inputs untouched."""
    q, k, v, params, gen = make_inputs(ir, B, T, 2, 8, 8, dtype=torch.float32, seed=stable_seed(where, chunk))
    inputs = {"q": q, "k": k, "v": v, **params}
    x = inputs[where]
    if value is None:
        pass
    elif x.dim() == 1:
        x[0] = value
    else:
        x[0, BAD, 0] = value
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    s0 = make_state(ir, n, 2, 8, 8, dtype=torch.float32, gen=gen) if ir.memory.kind == "mlp" else None
    o, final = module.memory(q, k, v, **params, backend=backend, chunk_size=chunk, initial_state=s0,
                             output_final_state=True, cu_seqlens=cu_seqlens)
    return o, final, x.dim() == 1


def _final_bad(final) -> torch.Tensor:
    parts = [final] if isinstance(final, torch.Tensor) else list(final)
    return torch.stack([~torch.isfinite(p).flatten(2).all(-1) for p in parts]).any(0)  # [N, H]


def _check(o, final, learnable, clean, clean_final):
    """Row 0, head 0 holds the non-finite input at BAD (a learnable [H]: head 0 of every row, from 0):
    every output it cannot reach equals the run without it (non-finite where that run diverges itself,
    as the reference does for some drawn gates), and its own token is non-finite."""
    first = 0 if learnable else BAD
    rows = slice(None) if learnable else slice(0, 1)

    def same(a, b, what):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")

    same(o[rows, :first, 0], clean[rows, :first, 0], f"tokens before {first}")
    assert (~torch.isfinite(o[rows, first, 0])).any(-1).all(), "the non-finite input vanished"
    same(o[:, :, 1], clean[:, :, 1], "another head")
    if not learnable:
        same(o[1:], clean[1:], "another sequence")
    fb = _final_bad(final)
    cb = _final_bad(clean_final)
    assert torch.equal(fb[:, 1], cb[:, 1]) and (learnable or torch.equal(fb[1:], cb[1:]))


@pytest.mark.parametrize("name,backend", [(n, "torch") for n in EXAMPLE_NAMES]
                         + [("log_cosh", "reference"), ("titans", "reference")])
def test_nan_stays_causal(compiled_examples, name, backend):
    module, ir = compiled_examples[name]
    for where in ["k", "v", *(p.name for p in ir.inputs())]:
        for chunk in sorted({1, 16, ir.algorithm.chunk}):
            o, final, learnable = _run(module, ir, backend, where, float("nan"), chunk)
            _check(o, final, learnable, *_run(module, ir, backend, where, None, chunk)[:2])


@pytest.mark.parametrize("name", ["gated_deltanet", "log_cosh", "retnet", "quantile", "memora"])
def test_nan_and_inf_stay_causal_on_triton(compiled_examples, name):
    module, ir = compiled_examples[name]
    for where, value in [("q", float("nan")), ("k", float("inf")), ("v", float("nan")),
                         *((p.name, float("nan")) for p in ir.inputs())]:
        o, final, learnable = _run(module, ir, "triton", where, value, 16)
        _check(o, final, learnable, *_run(module, ir, "triton", where, None, 16)[:2])


@pytest.mark.parametrize("norm", ["chunk", "token"])
def test_nan_stays_in_its_mlp_head_on_triton(tmp_path, norm):
    """Moneta on the MLP kernels, with lq(norm=chunk) as shipped and with lq(norm=token)."""
    text = (ROOT / "examples" / "moneta.miras").read_text().replace("lq(q=4)", f"lq(q=4, norm={norm})")
    compiled = compile_spec(text, "moneta.miras")
    module, ir = import_source(compiled.source, f"_nonfinite_moneta_{norm}", tmp_path), compiled.ir
    o, final, _ = _run(module, ir, "triton", "v", float("nan"), 16)
    _check(o, final, False, *_run(module, ir, "triton", "v", None, 16)[:2])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_stays_in_its_packed_sequence(compiled_examples, backend):
    """Packed sequences [0, 20), [20, 33), [33, 40): a nan at token 29 reaches 29-32 only."""
    module, ir = compiled_examples["gated_deltanet"]
    cu = torch.tensor([0, 20, 33, T])
    o, final, _ = _run(module, ir, backend, "v", float("nan"), 16, cu_seqlens=cu, B=1)
    bad = ~torch.isfinite(o[0, :, 0]).all(-1)
    assert bad.nonzero().flatten().tolist() == list(range(BAD, 33))
    assert not (~torch.isfinite(o[0, :, 1])).any()
    fb = _final_bad(final)
    assert fb[:, 0].tolist() == [False, True, False] and not fb[:, 1].any()


def test_nonfinite_token_pass_reads_every_gate_layout(compiled_examples):
    """The guard's one-pass kernel flags exactly the tokens whose q, k, v or gate ([B, T, H],
    [B, T, H, V], a per-head [H]; more than the four the kernel reads, the rest by torch) hold a nan or
    an inf, against torch.isfinite token by token."""
    module, _ = compiled_examples["gated_deltanet"]
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 37, 3, 8, 4
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    gates = [torch.rand(B, T, H, generator=gen), torch.rand(B, T, H, V, generator=gen),
             torch.rand(H, generator=gen), torch.rand(B, T, H, generator=gen),
             torch.rand(B, T, H, V, generator=gen), torch.rand(H, generator=gen)]
    spots = [(q, (0, 3, 1, 7), float("nan")), (k, (1, 36, 2, 0), float("inf")), (v, (1, 0, 0, 3), -float("inf")),
             (gates[0], (0, 10, 2), float("nan")), (gates[1], (1, 20, 1, 2), float("inf")),
             (gates[3], (0, 30, 0), float("nan")), (gates[4], (1, 5, 2, 1), float("nan"))]
    for x, at, value in spots:
        x[at] = value
    expect = torch.zeros(B, T, H, dtype=torch.bool)
    for x, at, _ in spots:
        expect[at[:3]] = True
    assert torch.equal(module._nonfinite_tokens(q, k, v, gates), expect)
    gates[2][1] = float("nan")  # a per-head gate among the kernel's four reaches every token of head 1
    gates[5][0] = float("inf")  # and one beyond them (torch) those of head 0
    expect[:, :, 1] = True
    expect[:, :, 0] = True
    assert torch.equal(module._nonfinite_tokens(q, k, v, gates), expect)
    assert not module._nonfinite_tokens(*(torch.ones_like(x) for x in (q, k, v)),
                                        [torch.ones_like(g) for g in gates]).any()
