"""The triton backend under torch.compile(fullgraph=True): no graph break, and the same numbers.

The kernels reach torch.compile as custom operators (torch.library), so Dynamo captures memory(),
its backward, step() and the whole block in one graph each. The graphs run with the "aot_eager"
backend here (AOTAutograd and the custom operators' fake implementations, without Inductor's code
generation, which needs a C++ or GPU toolchain); on a GPU, benchmarks/bench_compile.py runs Inductor
and CUDA graphs. Without a GPU the kernels run in Triton's interpreter: shapes stay small.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import (
    CountLaunches,
    LinearVariant,
    assert_close,
    compile_module,
    flatten_state,
    make_inputs,
    make_state,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "aot_eager"


def _leaves(ir, B, T, H, K, V, seed, dtype=torch.float32):
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=seed)
    state = make_state(ir, B, H, K, V, gen=gen, scale=0.5)
    return [x.to(dtype).to(DEVICE) for x in (q, k, v, *params.values(), *flatten_state(state))], list(params)


def _memory_fn(module, names, n_state, chunk):
    def run(*leaves):
        q, k, v = leaves[:3]
        params = dict(zip(names, leaves[3:3 + len(names)]))
        state = leaves[3 + len(names):]
        o, final = module.memory(q, k, v, **params, initial_state=state[0] if n_state == 1 else tuple(state),
                                 output_final_state=True, chunk_size=chunk, backend="triton")
        return o, *flatten_state(final)
    return run


def _forward_backward(fn, leaves, weights=None):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*leaves)
    if weights is None:
        gen = torch.Generator().manual_seed(7)
        weights = [torch.randn(x.shape, generator=gen).to(DEVICE) for x in outs]
    sum((x.float() * w).sum() for x, w in zip(outs, weights)).backward()
    return outs, [x.grad for x in leaves], weights


# the backward kernel of each family and its launches per call (T = 21 at chunk 16: two chunks; the map
# read-out runs once per chunk and weight matrix)
_BWD_KERNEL = {"matrix": ("_chunk_bwd_kernel", 1), "MLP": ("_mlp_bwd_kernel", 1),
               "MLP map read-out": ("_map_readout_bwd_kernel", 4)}


@pytest.mark.parametrize("name,chunk", [("retnet", 16), ("deltanet", 1), ("cauchy", 8), ("quantile", 16),
                                        ("yaad", 16), ("memora", 16)])
def test_memory_compiles_without_graph_breaks(compiled_examples, name, chunk):
    """memory() forward and backward in one compiled graph equal the eager triton call (a matrix memory
    at chunk 16, 1 and 8, with momentum, an MLP memory, and Memora: the torch backend's chunk loop around
    the map read-out's operators)."""
    module, ir = compiled_examples[name]
    torch._dynamo.reset()
    leaves, names = _leaves(ir, 1, 21, 2, 16, 16, seed=3)
    n_state = len(leaves) - 3 - len(names)
    fn = _memory_fn(module, names, n_state, chunk)
    outs, grads, weights = _forward_backward(fn, leaves)
    kernel, launches = _BWD_KERNEL[module.TRITON_KERNELS]
    counter = CountLaunches(getattr(module, kernel))
    setattr(module, kernel, counter)
    try:
        compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)
        c_outs, c_grads, _ = _forward_backward(compiled, leaves, weights)
    finally:
        setattr(module, kernel, counter.kernel)
    assert counter.launches == launches, "the compiled backward did not run the triton kernel"
    for i, (a, b) in enumerate(zip(c_outs, outs)):
        assert_close(a, b, f"{name}: output {i}", rtol=1e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(c_grads, grads)):
        assert b is not None, f"{name}: input {i} got no gradient"
        assert_close(a, b, f"{name}: gradient of input {i}", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,chunk", [("gated_deltanet", 1), ("titans", 8)])
def test_packed_memory_compiles_without_graph_breaks(compiled_examples, name, chunk):
    """memory() over packed sequences (cu_seqlens) compiles into one graph: the kernels (matrix and MLP
    memories) take the offsets as a tensor, and nothing reads their values on the host."""
    module, ir = compiled_examples[name]
    torch._dynamo.reset()
    q, k, v, params, gen = make_inputs(ir, 1, 30, 2, 16, 16, seed=5)
    state = flatten_state(make_state(ir, 2, 2, 16, 16, gen=gen, scale=0.5))
    n_state = len(state)
    leaves = [x.float().to(DEVICE) for x in (q, k, v, *params.values(), *state)]
    cu = torch.tensor([0, 11, 30], device=DEVICE)

    def fn(*xs):
        s0 = xs[-n_state:] if ir.memory.kind == "mlp" else xs[-1]
        o, final = module.memory(*xs[:3], **dict(zip(params, xs[3:-n_state])), initial_state=s0,
                                 output_final_state=True, chunk_size=chunk, backend="triton", cu_seqlens=cu)
        return (o, *final) if isinstance(final, tuple) else (o, final)

    outs, grads, weights = _forward_backward(fn, leaves)
    c_outs, c_grads, _ = _forward_backward(torch.compile(fn, fullgraph=True, backend=BACKEND), leaves, weights)
    for i, (a, b) in enumerate(zip(c_outs, outs)):
        assert_close(a, b, f"{name}: output {i}", rtol=1e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(c_grads, grads)):
        assert b is not None, f"{name}: input {i} got no gradient"
        assert_close(a, b, f"{name}: gradient of input {i}", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_step_compiles_without_graph_breaks(compiled_examples, name):
    """A compiled decode loop (chunk 1: pos stays 0, one graph) equals the eager fused step."""
    module, ir = compiled_examples[name]
    torch._dynamo.reset()
    B, H, K = 2, 2, 16
    q, k, v, params, gen = make_inputs(ir, B, 3, H, K, K, seed=5)
    params = {n: (x if x.dim() == 1 else x.float()) for n, x in params.items()}
    state = module.decode_state(make_state(ir, B, H, K, K, gen=gen).float())

    def step(t, state):
        return module.step(q[:, t].float(), k[:, t].float(), v[:, t].float(),
                           **{n: (x if x.dim() == 1 else x[:, t]) for n, x in params.items()},
                           state=state, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend=BACKEND)
    eager_state, comp_state = state, state
    for t in range(3):
        o, eager_state = step(t, eager_state)
        co, comp_state = compiled(t, comp_state)
        assert_close(co, o, f"{name}: output of token {t}", rtol=1e-6, atol=1e-7)
        assert_close(comp_state.state, eager_state.state, f"{name}: state after token {t}", rtol=1e-6,
                     atol=1e-7)


def test_step_with_momentum_and_a_map_compiles(tmp_path, monkeypatch):
    """The fused step of a momentum layer with lq(norm=chunk) (four outputs, CHUNK_END at a chunk's last
    token) in a compiled decode loop over a chunk end: no graph break, and it equals the eager loop."""
    variant = LinearVariant("momentum_lq", "l2", ["gate b : head = sigmoid(rank=4, init=0.8)"],
                            "decay(0.9) + lq(q=3)", "0.3", 4, beta="b")
    module, compiled_spec = compile_module(variant.spec("CompileStepMap"), "step_map.miras", tmp_path,
                                           "_compile_step_map")
    ir = compiled_spec.ir
    counter = CountLaunches(module._step_kernel)
    monkeypatch.setattr(module, "_step_kernel", counter)
    torch._dynamo.reset()
    B, H, K, T = 2, 2, 16, 6
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, K, seed=6)
    params = {n: (x if x.dim() == 1 else x.float()) for n, x in params.items()}
    state = module.decode_state(tuple(x.float() for x in make_state(ir, B, H, K, K, gen=gen, scale=0.5)))
    _compiled_decode_equals_eager(module, q, k, v, params, state, T, counter)


def _compiled_decode_equals_eager(module, q, k, v, params, state, T, counter):
    """T tokens of step() (chunk 4, so a chunk end is crossed), eager and under torch.compile(fullgraph):
    the same outputs, carried states and chunk bases, and every step ran the fused kernel (the counter
    sees each launch twice: once traced, once eager)."""
    def step(t, state):
        return module.step(q[:, t].float(), k[:, t].float(), v[:, t].float(),
                           **{n: (x if x.dim() == 1 else x[:, t]) for n, x in params.items()},
                           state=state, chunk_size=4, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend=BACKEND)
    eager_state, comp_state = state, state
    for t in range(T):
        o, eager_state = step(t, eager_state)
        co, comp_state = compiled(t, comp_state)
        assert_close(co, o, f"output of token {t}", rtol=1e-6, atol=1e-7)
        assert comp_state.pos == eager_state.pos == (t + 1) % 4
        for name, a, b in zip(("state", "base"), (comp_state.state, comp_state.base),
                              (eager_state.state, eager_state.base)):
            for i, (x, y) in enumerate(zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,))):
                assert_close(x, y, f"{name}[{i}] after token {t}", rtol=1e-6, atol=1e-7)
    assert counter.launches == 2 * T, "a step did not run the fused kernel"


def test_mlp_step_compiles(compiled_examples, monkeypatch):
    """The fused step of an MLP memory (Titans: momentum, two weight matrices, seven outputs) in a
    compiled decode loop over a chunk end: no graph break, and it equals the eager loop."""
    module, ir = compiled_examples["titans"]
    counter = CountLaunches(module._step_kernel)
    monkeypatch.setattr(module, "_step_kernel", counter)
    torch._dynamo.reset()
    B, H, K, T = 1, 2, 8, 6
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, K, seed=8)
    params = {n: x.float() for n, x in params.items()}
    state = module.decode_state(tuple(x.float() for x in make_state(ir, B, H, K, K, gen=gen)))
    _compiled_decode_equals_eager(module, q, k, v, params, state, T, counter)


def test_block_compiles_without_graph_breaks(compiled_examples):
    """The whole generated block (projections, gates, memory, norm, output) in one graph, fwd and bwd."""
    module, _ = compiled_examples["retnet"]
    torch._dynamo.reset()
    torch.manual_seed(11)
    block = module.RetNet(32, heads=2, key_dim=16, value_dim=16, chunk_size=16, backend="triton").to(DEVICE)
    x = torch.randn(1, 35, 32, device=DEVICE)  # two whole chunks through memory(), 3 tokens through step()
    y, _ = block(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    counter = CountLaunches(module._chunk_fwd_kernel)
    module._chunk_fwd_kernel = counter
    try:
        cy, _ = torch.compile(block, fullgraph=True, backend=BACKEND)(x)
        cy.square().sum().backward()
    finally:
        module._chunk_fwd_kernel = counter.kernel
    assert counter.launches == 1, "the compiled block did not run the triton kernel"
    assert_close(cy, y, "block output", rtol=1e-5, atol=1e-6)
    for n, p in block.named_parameters():
        assert_close(p.grad, grads[n], f"gradient of {n}", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_loop_inside_chunks_compiles_three_graphs(compiled_examples, backend):
    """DecodeState.pos is a Python int: a compiled decode loop at chunk 4 traces a chunk's first token,
    its inner tokens (pos symbolic) and its last, three graphs for any number of steps, and equals the
    eager loop."""
    module, ir = compiled_examples["retnet"]
    torch._dynamo.reset()
    B, H, K, T = 1, 2, 16, 11
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, K, seed=9)
    params = {n: (x if x.dim() == 1 else x.float()) for n, x in params.items()}
    state = module.decode_state(make_state(ir, B, H, K, K, gen=gen).float())
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(qt, kt, vt, pt, state):
        return module.step(qt, kt, vt, **pt, state=state, chunk_size=4, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend=counting)
    eager_state, comp_state = state, state
    for t in range(T):
        token = [x[:, t].float().clone() for x in (q, k, v)]
        pt = {n: (x if x.dim() == 1 else x[:, t].clone()) for n, x in params.items()}
        o, eager_state = step(*token, pt, eager_state)
        co, comp_state = compiled(*token, pt, comp_state)
        assert_close(co, o, f"output of token {t}", rtol=1e-6, atol=1e-7)
    assert_close(comp_state.state, eager_state.state, "final state", rtol=1e-6, atol=1e-7)
    assert len(graphs) <= 3, f"{len(graphs)} graphs for {T} steps"
