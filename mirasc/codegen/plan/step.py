"""The fused decode step's plan: what templates/triton_step.py.j2 generates for a layer, or why it cannot.

The step kernel applies one token of a matrix memory's gd rule in chunks (docs/semantics.md, "Chunks"
and "The decode step"): y = k Z_b, g = eta dL/dy(y, v), Z' = alpha Z - k^T g, o = q Z'. Its variants
are tl.constexpr flags (NEEDS_Y, AT_RETAINED, per-channel operands) and absent tensors (None): the plan
holds the values the launcher passes for them, and the one table of launch settings.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...ir import LayerIR
from . import Refusal


@dataclass(frozen=True)
class StepInput:
    """A runtime input the kernel reads: `name` is its identifier in generated code (u<i>, see
    mirasc.codegen.triton.input_ident), `public` the spec's name, `layout` "head" ([B, H]), "channel"
    ([B, H, V]) or "learnable" ([H])."""

    name: str
    public: str
    layout: str

    @property
    def channel(self) -> bool:
        return self.layout == "channel"


@dataclass(frozen=True)
class StepOperand:
    """The learning rate or the decay as the kernel reads it: an input (`arg` names it in the launcher)
    or a literal (`arg` is "None" and the kernel uses `lit`, a tl.constexpr)."""

    lit: float  # the literal (1.0 for an input: unused)
    input: StepInput | None

    @property
    def arg(self) -> str:
        return "None" if self.input is None else self.input.name

    @property
    def channel(self) -> bool:
        return self.input is not None and self.input.channel


@dataclass(frozen=True)
class StepPlan:
    inputs: tuple[StepInput, ...]  # every input the kernel reads, each once, in keyword order
    bias_params: tuple[StepInput, ...]  # the bias's non-constant parameters, in _bias_grad's order
    lr: StepOperand
    decay: StepOperand  # the literal 1.0 without decay
    needs_y: bool  # the bias gradient depends on y = k Z_b (else y is never computed)
    at_retained: bool  # y at the retained point alpha Z_b; the kernel writes the next token's base
    max_dim: int  # the largest K and V one program holds in registers
    # launch settings: (largest BK * BV, num_warps), the first row that fits the runtime tile is used
    warps: tuple[tuple[int, int], ...]
    helpers: tuple[str, ...]  # the mirasc.codegen.triton_lib functions the kernel calls

    @property
    def library(self) -> str:
        """The source of the helpers (and their callees), pasted into the generated module."""
        from .. import triton_lib

        return triton_lib.source(self.helpers)


def _input(ir: LayerIR, name: str) -> StepInput:
    from ..triton import input_ident, layout_of

    p = {p.name: p for p in ir.params}[name]
    return StepInput(input_ident(ir, name), name, layout_of(p))


def _operand(ir: LayerIR, op) -> StepOperand:
    if op is None:
        return StepOperand(1.0, None)
    if not isinstance(op, str):
        return StepOperand(float(op), None)
    p = {p.name: p for p in ir.params}[op]
    if p.kind == "const":
        return StepOperand(float(p.value), None)
    return StepOperand(1.0, _input(ir, op))


def plan_step(ir: LayerIR) -> StepPlan | Refusal:
    """The step kernel's plan, or the one reason the layer has none."""
    from .linear import refusal_reason

    if ir.memory.kind != "linear":
        return Refusal("the fused decode step covers matrix memories only")
    why = refusal_reason(ir)
    if why is not None:
        return Refusal(why)
    if ir.retention.effective_map != "id":
        return Refusal("the fused decode step does not cover retention maps yet")
    if ir.algorithm.kind != "gd":
        return Refusal("the fused decode step does not cover momentum yet")
    lr = _operand(ir, ir.algorithm.lr)
    decay = _operand(ir, ir.retention.alpha)
    has_decay = decay.input is not None or decay.lit != 1.0
    used = {op for op in (ir.algorithm.lr, ir.retention.alpha, *ir.bias.params) if isinstance(op, str)}
    inputs = tuple(_input(ir, p.name) for p in ir.backend_inputs() if p.name in used)
    return StepPlan(
        inputs=inputs,
        bias_params=tuple(_input(ir, n) for n in ir.bias.params),
        lr=lr,
        decay=decay,
        needs_y=ir.bias.klass != "independent",
        at_retained=ir.algorithm.at == "retained" and has_decay,
        max_dim=128,
        warps=((4096, 4), (128 * 128, 8)),
        helpers=("_step_input", "_step_vecmat"),
    )


__all__ = ["StepInput", "StepOperand", "StepPlan", "plan_step"]
