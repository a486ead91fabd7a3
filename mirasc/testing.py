"""Compile a spec into an importable module and draw fresh random inputs for its layer.

One place for what the tests (tests/), the benchmark scripts (benchmarks/) and `mirasc bench` all need:

- `import_source` / `compile_module`: write generated source into a folder and import it from the file
  (Triton's jit reads a kernel's source from its file, so the module cannot be exec'd from a string);
- `make_inputs`: q, k (unit norm, as the block makes them), v and every runtime parameter of a layer
  (gates and learnables) drawn uniformly in a range that keeps the recurrence stable;
- `make_state`: a random, never zero, initial state in the layout of docs/semantics.md ("State
  objects"): one matrix for a linear memory, one per MLP layer, then the momentum buffers
  (`layer_dims` gives the matrices' shapes, `flatten_state` a state's tensors as a list);
- `draw_lengths` / `cu_seqlens`: packed variable-length batches;
- `stable_seed`, `rel`: reproducible seeds from test parameters, and the relative error every
  agreement check reports.

Every draw takes a seeded `torch.Generator` (or a seed), so a failure reproduces exactly. Nothing here
depends on pytest.
"""
from __future__ import annotations

import itertools
import types
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Uniform ranges per gate activation in which every recurrence of the examples and the tested variants
# stays stable over short sequences (tens of tokens): decays near 1, moderate learning rates.
STABLE_RANGES = {"sigmoid": (0.5, 0.99), "softplus": (0.05, 0.5), "exp": (0.05, 0.5), "relu": (0.05, 0.5),
                 "tanh": (0.1, 0.9), "identity": (0.5, 1.5)}
DEFAULT_RANGE = (0.1, 0.9)


def stable_range(p) -> tuple[float, float]:
    """The range of a runtime parameter for short test sequences: by its activation (STABLE_RANGES)."""
    return STABLE_RANGES.get(p.activation, DEFAULT_RANGE)


def long_sequence_range(p) -> tuple[float, float]:
    """The range for benchmark-length sequences (thousands of tokens): sigmoid decays in (0.9, 0.99) and
    the delta rule's step size `beta` in (0.1, 0.9) as in DeltaNet; other learnables (e.g. the Cauchy
    scale c) near 1, where the loss is well conditioned; other rates small enough that a chunk's summed
    gradients stay stable."""
    if p.activation == "sigmoid":
        return (0.1, 0.9) if p.name == "beta" else (0.9, 0.99)
    if p.kind == "learnable":
        return 0.5, 1.5
    return 0.005, 0.02


def import_source(source: str, name: str, folder: str | Path) -> types.ModuleType:
    """Write generated source to folder/<name>.py and import it as module `name` (registered in
    sys.modules, as dataclasses and pickling need)."""
    from .compiler import import_file

    target = Path(folder) / f"{name}.py"
    target.write_text(source, encoding="utf-8")
    return import_file(name, target)


def compile_module(text: str, file: str, folder: str | Path, name: str | None = None, prefix: str = "_mirasc_"):
    """Compile spec text (`file` names it in errors) and import the generated module from `folder`:
    (module, compiled), where compiled.ir is the layer's IR. The module is `name`, else prefix + the
    layer's file stem."""
    from .compiler import compile_spec

    compiled = compile_spec(text, file)
    return import_source(compiled.source, name or f"{prefix}{compiled.stem}", folder), compiled


def layer_dims(ir, K: int, V: int) -> list[tuple[int, int]]:
    """Shapes of the memory's weight matrices, in order (linear: one K x V matrix; an MLP: K -> hidden
    (expansion * K) ... -> V over `depth` layers)."""
    mem = ir.memory
    if mem.kind == "linear":
        return [(K, V)]
    hidden = mem.expansion * K
    return list(itertools.pairwise([K] + [hidden] * (mem.depth - 1) + [V]))


def make_state(ir, B: int, H: int, K: int, V: int, dtype=torch.float64, gen=None, scale: float = 1.0,
               device="cpu"):
    """A random initial state: weights ~ scale * N(0, 1/fan_in), momentum buffers ~ 0.1 * N(0, 1/fan_in).
    A tensor for a linear memory under gd, else a tuple (weights, then momenta)."""
    dims = layer_dims(ir, K, V)
    mats = [torch.randn(B, H, a, b, dtype=dtype, generator=gen, device=device) * scale / a ** 0.5
            for a, b in dims]
    if ir.algorithm.kind == "momentum":
        mats += [0.1 * torch.randn(B, H, a, b, dtype=dtype, generator=gen, device=device) / a ** 0.5
                 for a, b in dims]
    if ir.memory.kind == "linear" and ir.algorithm.kind == "gd":
        return mats[0]
    return tuple(mats)


def make_inputs(ir, B: int, T: int, H: int, K: int, V: int, dtype=torch.float64, seed: int = 0,
                device="cpu", ranges: Callable = stable_range, gen: torch.Generator | None = None):
    """Fresh random (q, k, v, params, gen): q, k unit-norm [B, T, H, K], v [B, T, H, V], and every
    runtime parameter in ir.inputs() order, uniform in ranges(p): a learnable [H], a per-head gate
    [B, T, H], a per-channel gate [B, T, H, V]. Draws from `gen` (else a generator seeded with `seed` on
    `device`), and returns it, so that a state or loss weights drawn next follow reproducibly."""
    if gen is None:
        gen = torch.Generator(device=device).manual_seed(seed)
    like = {"dtype": dtype, "generator": gen, "device": device}
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, **like), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, **like), dim=-1)
    v = torch.randn(B, T, H, V, **like)
    params = {}
    for p in ir.inputs():
        lo, hi = ranges(p)
        shape = (H,) if p.kind == "learnable" else (B, T, H) if p.shape == "head" else (B, T, H, V)
        params[p.name] = lo + (hi - lo) * torch.rand(shape, **like)
    return q, k, v, params, gen


def flatten_state(state) -> list:
    """A state (None, one tensor, or a tuple of tensors) as a list of its tensors."""
    if state is None:
        return []
    return [state] if torch.is_tensor(state) else list(state)


def state_vector(state) -> torch.Tensor:
    """A state (one tensor or a tuple of tensors) as one flat vector, to compare whole states."""
    return torch.cat([x.flatten() for x in flatten_state(state)])


def decode_steps(module, qkv, params: dict, state, chunk: int, backend: str, start: int, stop: int):
    """module.step() over tokens start..stop-1 of q, k, v [B, T, H, *] with the gates' token slices ->
    (outputs [B, stop - start, H, V], the last DecodeState); every output keeps v's dtype and shape."""
    q, k, v = qkv
    outs = []
    for t in range(start, stop):
        o, state = module.step(q[:, t], k[:, t], v[:, t], **{n: (p if p.dim() == 1 else p[:, t])
                                                             for n, p in params.items()},
                               state=state, chunk_size=chunk, backend=backend)
        assert o.dtype == v.dtype and o.shape == (v.shape[0], v.shape[2], v.shape[3])
        outs.append(o)
    return torch.stack(outs, 1), state


def _f64(xs):
    """A tensor, or a tuple / list of them, in float64."""
    if isinstance(xs, torch.Tensor):
        return xs.double()
    return (tuple if isinstance(xs, tuple) else list)(x.double() for x in xs)


def reference_call(module, qkv, params: dict, s0, chunk: int):
    """The oracle of the decode tests: one memory() call over the whole sequence on the reference backend
    in float64, from the float64 images of the inputs and of the initial state -> (o, final state)."""
    return module.memory(*_f64(qkv), **dict(zip(params, _f64(list(params.values())))), initial_state=_f64(s0),
                         output_final_state=True, chunk_size=chunk, backend="reference")


def closed_state(ir, decoded, params: dict):
    """A DecodeState's state as memory() returns it at the end of a call: elastic_net(form=retain) closes
    a call's unfinished last chunk with W = S_gamma(Z) of every weight matrix, gamma the last token's
    (params: the call's gates by name). Other layers, a state at a chunk boundary and the momentum
    buffers are carried as they are."""
    state = decoded.state
    if ir.retention.form != "prox" or decoded.pos == 0:
        return state
    g = ir.retention.gamma
    if isinstance(g, str):
        g = params[g].float()
        g = g[None, :, None, None] if g.dim() == 1 else (g[:, -1, :, None, None] if g.dim() == 3 else g[:, -1, :, None])
    else:
        g = torch.tensor(float(g))

    def close(z):
        return z - torch.minimum(torch.maximum(z, -g), g)

    if isinstance(state, torch.Tensor):
        return close(state)
    n = len(decoded.base) if isinstance(decoded.base, tuple) else 1  # the weight matrices come first
    return (*(close(z) for z in state[:n]), *state[n:])


def prefill_then_steps(module, qkv, params: dict, s0, chunk: int, prefill: int, stop: int,
                       backend: str = "triton"):
    """memory() over tokens 0..prefill-1 (the module's default backend), then step() with `backend` over
    prefill..stop-1 from its final state -> (prefill outputs, decoded outputs, the last DecodeState)."""
    q, k, v = qkv
    P = prefill
    o_pre, s = module.memory(q[:, :P], k[:, :P], v[:, :P],
                             **{n: (p if p.dim() == 1 else p[:, :P]) for n, p in params.items()},
                             initial_state=s0, output_final_state=True, chunk_size=chunk)
    o_dec, state = decode_steps(module, qkv, params, module.decode_state(s), chunk, backend, P, stop)
    return o_pre, o_dec, state


def draw_lengths(total: int, n: int, seed: int) -> list[int]:
    """n positive sequence lengths summing to total, from a seeded random split."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) + 0.2
    raw = (w / w.sum() * (total - n)).floor().long() + 1
    raw[-1] += total - raw.sum()
    return raw.tolist()


def cu_seqlens(lengths: Sequence[int], dtype=torch.long, device="cpu") -> torch.Tensor:
    """The cumulative offsets [0, l0, l0 + l1, ...] that memory() takes for packed sequences."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype, device=device)


def stable_seed(*parts) -> int:
    """A seed from a test's parameters that is the same in every run (Python's str hash is not)."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements, in float64 (on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
