"""The generated block's packed documents (cu_seqlens) and its input checks."""
from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE_NAMES, stable_seed


def _block_class(module, ir):
    return getattr(module, ir.name)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_packed_documents_equal_separate_calls(compiled_examples, name):
    """One packed call over three documents equals three fresh calls, outputs and every gradient:
    no document reads another's memory or convolution window."""
    module, ir = compiled_examples[name]
    torch.manual_seed(stable_seed(name))
    block = _block_class(module, ir)(24, heads=2, key_dim=8, value_dim=8, chunk_size=4,
                                     backend="torch").double()
    lens = [5, 11, 3]  # not multiples of the chunk: every document ends in an open chunk
    xs = [torch.randn(1, n, 24, dtype=torch.float64, requires_grad=True) for n in lens]
    cu = torch.tensor([0, 5, 16, 19])
    y, state = block(torch.cat(xs, 1), cu_seqlens=cu)
    assert state is None
    ref = torch.cat([block(x)[0] for x in xs], 1)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [*xs, *block.parameters()], allow_unused=True)
    ref_grads = torch.autograd.grad((ref * w).sum(), [*xs, *block.parameters()], allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_packed_conv_does_not_cross_documents(compiled_examples):
    """Changing the last token of document 1 leaves every output of document 2 unchanged."""
    module, ir = compiled_examples["gated_deltanet"]
    assert ir.block.conv > 1
    block = _block_class(module, ir)(16, heads=1, key_dim=8, value_dim=8).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    cu = torch.tensor([0, 4, 10])
    y0, _ = block(x, cu_seqlens=cu)
    x2 = x.clone()
    x2[0, 3] += 5.0
    y1, _ = block(x2, cu_seqlens=cu)
    assert (y1[0, 3] - y0[0, 3]).abs().max() > 1e-3  # the change is seen where it is
    torch.testing.assert_close(y1[0, 4:], y0[0, 4:], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["deltanet", "titans"])
def test_block_input_errors(compiled_examples, name):
    module, ir = compiled_examples[name]
    cls = _block_class(module, ir)
    block = cls(16, heads=2, key_dim=8, value_dim=8)
    good = torch.randn(2, 3, 16)
    _, state = block(good)
    cases = [
        (torch.randn(3, 16), None, "x must have shape [B, T, d_model = 16]"),
        (torch.randn(1, 4, 15), None, "x must have shape [B, T, d_model = 16]"),
        (torch.randn(1, 0, 16), None, "the sequence is empty"),
        (torch.randn(1, 4, 16, dtype=torch.float64), None, "x has dtype torch.float64"),
        (torch.randint(0, 5, (1, 4, 16)), None, "floating-point"),
        (torch.randn(1, 3, 16), (1, 2), "state must be the LayerState"),
        (torch.randn(1, 3, 16), "state", "state must be the LayerState"),
        (torch.randn(1, 3, 16), state, "2"),  # a state from a batch of 2 used with a batch of 1
    ]
    for x, st, message in cases:
        with pytest.raises((TypeError, ValueError)) as err:
            block(x, st)
        assert message in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="state must be None"):
        block(torch.randn(1, 4, 16), state, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"one batch row"):
        block(torch.randn(2, 4, 16), cu_seqlens=torch.tensor([0, 4]))
    for kwargs in ({"d_model": 0}, {"d_model": 16, "heads": 0}, {"d_model": 16, "key_dim": -1},
                   {"d_model": 16.0}, {"d_model": 16, "backend": "cuda"}, {"d_model": 16, "chunk_size": 3}):
        with pytest.raises(ValueError):
            cls(**kwargs)


def test_memory_argument_errors(compiled_examples):
    module, ir = compiled_examples["deltanet"]
    from conftest import make_inputs
    q, k, v, params, _ = make_inputs(ir, 1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="from 1 to 256"):
        module.memory(q, k, v, **params, chunk_size=2 ** 20)
    with pytest.raises(TypeError, match="output_final_state must be True or False"):
        module.memory(q, k, v, **params, output_final_state="no")
