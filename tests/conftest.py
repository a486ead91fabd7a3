"""Shared helpers: compile the examples once per session and draw fresh inputs for their layers."""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before any kernel is
# defined, i.e. before a generated module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.miras"))
EXAMPLE_NAMES = [p.stem for p in EXAMPLES]

# Where a gate's activation maps, draw values in a range that keeps every recurrence stable.
_RANGES = {"sigmoid": (0.5, 0.99), "softplus": (0.05, 0.5), "exp": (0.05, 0.5), "relu": (0.05, 0.5),
           "tanh": (0.1, 0.9), "identity": (0.5, 1.5)}


@pytest.fixture(scope="session")
def compiled_examples(tmp_path_factory):
    """{stem: (module, ir)} for every example, compiled into one temporary folder."""
    from mirasc.compiler import compile_spec

    out = tmp_path_factory.mktemp("generated")
    result = {}
    for path in EXAMPLES:
        compiled = compile_spec(path.read_text(), str(path))
        module = import_source(compiled.source, f"_mirasc_test_{compiled.stem}", out)
        result[path.stem] = (module, compiled.ir)
    return result


def import_source(source: str, name: str, folder: Path):
    """Write generated source to folder/<name>.py and import it as module `name` (from a file: Triton's
    jit reads the kernels' source)."""
    target = Path(folder) / f"{name}.py"
    target.write_text(source)
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def layer_dims(ir, B, H, K, V):
    """Shapes of the weight matrices of the memory, in order (linear: one K x V matrix)."""
    mem = ir.memory
    if mem.kind == "linear":
        return [(K, V)]
    hidden = mem.expansion * K
    dims = [K] + [hidden] * (mem.depth - 1) + [V]
    return list(itertools.pairwise(dims))


def make_state(ir, B, H, K, V, dtype=torch.float64, gen=None, scale=1.0):
    """A random initial state in the layout of docs/semantics.md ("State objects")."""
    mats = [torch.randn(B, H, a, b, dtype=dtype, generator=gen) * scale / a ** 0.5
            for a, b in layer_dims(ir, B, H, K, V)]
    if ir.algorithm.kind == "momentum":
        mats += [0.1 * torch.randn(B, H, a, b, dtype=dtype, generator=gen) / a ** 0.5
                 for a, b in layer_dims(ir, B, H, K, V)]
    if ir.memory.kind == "linear" and ir.algorithm.kind == "gd":
        return mats[0]
    return tuple(mats)


def stable_seed(*parts) -> int:
    """A seed from a test's parameters that is the same in every run (Python's str hash is not)."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=0):
    """Fresh random q, k (unit norm, as the block makes them), v and every runtime parameter."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=dtype, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=dtype, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, dtype=dtype, generator=gen)
    params = {}
    for p in ir.inputs():
        lo, hi = _RANGES.get(p.activation, (0.1, 0.9))
        shape = (H,) if p.kind == "learnable" else (B, T, H) if p.shape == "head" else (B, T, H, V)
        params[p.name] = lo + (hi - lo) * torch.rand(shape, dtype=dtype, generator=gen)
    return q, k, v, params, gen


class CountLaunches:
    """Stands in for a generated module's kernel and counts its launches (so a silent torch fallback,
    which would compute the same numbers, fails the test that expects the kernel)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def flatten_state(state):
    if state is None:
        return []
    return [state] if torch.is_tensor(state) else list(state)


def assert_close(a, b, what, rtol=1e-7, atol=1e-9):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
