"""Shared test fixtures: the examples compiled once per session; the helpers that compile a spec and draw
inputs live in mirasc/testing.py (also used by benchmarks/ and `mirasc bench`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mirasc.testing import (  # noqa: F401 - the tests import these from here
    closed_state,
    compile_module,
    decode_steps,
    flatten_state,
    import_source,
    layer_dims,
    make_inputs,
    make_state,
    prefill_then_steps,
    reference_call,
    rel,
    stable_seed,
    state_vector,
)

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before any kernel is
# defined, i.e. before a generated module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.miras"))
EXAMPLE_NAMES = [p.stem for p in EXAMPLES]


@pytest.fixture(scope="session")
def compiled_examples(tmp_path_factory):
    """{stem: (module, ir)} for every example, compiled into one temporary folder."""
    out = tmp_path_factory.mktemp("generated")
    result = {}
    for path in EXAMPLES:
        module, compiled = compile_module(path.read_text(), str(path), out, f"_mirasc_test_{path.stem}")
        result[path.stem] = (module, compiled.ir)
    return result


_DTYPE_TAGS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class LinearVariant:
    """A linear-memory layer the triton tests compile: its bias, declarations, retention and lr (spec
    text), the algorithm's chunk and `at`, head dims, the dtype of q, k, v, and for some tests the
    momentum `beta` (None: gd), the sequence length and whether the run starts from a random state."""

    name: str
    bias: str
    decls: tuple[str, ...]
    retention: str
    lr: str
    chunk: int
    at: str = "previous"
    K: int = 16
    V: int = 16
    dtype: torch.dtype = torch.float32
    beta: str | None = None
    T: int | None = None
    with_s0: bool = True

    def __post_init__(self):
        object.__setattr__(self, "decls", tuple(self.decls))

    @property
    def id(self) -> str:
        """The test id, e.g. gated_delta-chunk1-fp32."""
        return f"{self.name}-chunk{self.chunk}-{_DTYPE_TAGS[self.dtype]}"

    def spec(self, layer: str, heads: int = 2) -> str:
        """The .miras text of this variant as `layer Layer { ... }`."""
        algorithm = (f"gd(lr={self.lr}, chunk={self.chunk}, at={self.at})" if self.beta is None
                     else f"momentum(beta={self.beta}, lr={self.lr}, chunk={self.chunk}, at={self.at})")
        return "\n".join([f"layer {layer} {{", f"    heads {heads}", f"    key_dim {self.K}",
                          f"    value_dim {self.V}", "    memory linear", *("    " + d for d in self.decls),
                          f"    bias {self.bias}", f"    retention {self.retention}",
                          f"    algorithm {algorithm}", "}"])


def indexed_params(variants) -> list:
    """pytest.param(index, variant, id=variant.id) for each variant: readable ids, while the index keeps
    each variant's seed. The ids must be unique."""
    ids = [v.id for v in variants]
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
    return [pytest.param(i, v, id=v.id) for i, v in enumerate(variants)]


class CountLaunches:
    """Stands in for a generated module's kernel and counts its launches (so a silent torch fallback,
    which would compute the same numbers, fails the test that expects the kernel)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def assert_close(a, b, what, rtol=1e-7, atol=1e-9):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
