"""The fused decode step's plan: what templates/triton_step.py.j2 generates for a layer, or why it cannot.

The step kernel applies one token of a matrix memory's chunk rule (docs/semantics.md, "Chunks" and "The
decode step"): y = k map(Z_b), g = eta dL/dy(y, v), m' = beta m + k^T g (momentum), Z' = alpha Z - m'
(gd: - k^T g), o = q map(Z'). Its variants are tl.constexpr flags (NEEDS_Y, AT_RETAINED, MOMENTUM, MAP
and the map's constants, per-channel operands) and absent tensors (None): the plan holds the values the
launcher passes for them, and the one table of launch settings. It decides on its own which layers it
covers, independently of the chunk kernels' plan (plan/linear.py).
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
class StepLq:
    """Moneta's lq map as the kernel's constexprs: W = Z * r with r = 1 / max(||Z||_q^(q-2), eps)
    (_step_lq_rnorm)."""

    q: float
    qi: int  # q when it is an integer from 2 to 8 (|z|^q as products, _lq_pow), else 0
    pw: float  # (q - 2) / q
    eps: float
    r0: float  # r at Z = 0: 1 / eps for q > 2 (the clamp), 0 for q < 2 (an infinite norm)


def _lq(q: float, eps: float) -> StepLq:
    qi = int(q) if q == int(q) and 2 <= q <= 8 else 0
    return StepLq(q=float(q), qi=qi, pw=(q - 2.0) / q, eps=float(eps), r0=1.0 / eps if q > 2.0 else 0.0)


@dataclass(frozen=True)
class StepPlan:
    inputs: tuple[StepInput, ...]  # every input the kernel reads, each once, in keyword order
    bias_params: tuple[StepInput, ...]  # the bias's non-constant parameters, in _bias_grad's order
    lr: StepOperand
    decay: StepOperand  # the literal 1.0 without decay
    momentum: bool  # the state is (Z, m): m' = beta m + k^T g, Z' = alpha Z - m'
    beta: StepOperand  # the momentum decay (the literal 1.0 for gd: unused)
    needs_y: bool  # the bias gradient depends on y = k map(Z_b) (else y is never computed)
    at_retained: bool  # y at the retained point map(alpha Z_b); the kernel writes the next token's base
    map: str  # the retention map W = map(Z): id, lq, softmax, sigmoid, soft_threshold
    base_map: bool  # y reads map(Z_b) (False for id, and for elastic_net(form=retain), whose base is W)
    prox: bool  # elastic_net(form=retain): the token that ends a chunk carries W = S_gamma(Z')
    gamma: StepOperand  # the soft threshold (the literal 0.0 without elastic_net)
    kl_axis: str  # softmax over "key" (rows), "value" (columns) or "all"
    kl_scale: float
    lq: StepLq  # the lq map's constants (unused for other maps)
    lq_chunk: bool  # lq(norm=chunk): a token inside a chunk reads Z' / n(Z_b), the chunk's last Z' / n(Z')
    bias_src: str  # the @triton.jit _bias_grad (printed by the chunk kernels too; see the template)
    max_dim: int  # the largest K and V one program holds in registers
    # launch settings: (largest BK * BV, num_warps), the first row that fits the runtime tile is used
    warps: tuple[tuple[int, int], ...]
    helpers: tuple[str, ...]  # the mirasc.codegen.triton_lib functions the kernel calls

    @property
    def chunk_end(self) -> bool:
        """Whether the kernel needs to know that the token ends its chunk (a tl.constexpr CHUNK_END)."""
        return self.prox or self.lq_chunk

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
    from ..triton import bias_functions, bias_params_of

    if ir.memory.kind != "linear":
        return Refusal("the fused decode step covers matrix memories only")
    if ir.bias.vjp is None:
        return Refusal("the bias carries no derived Triton functions (no VJP)")
    ret, alg = ir.retention, ir.algorithm
    lr = _operand(ir, alg.lr)
    decay = _operand(ir, ret.alpha)
    momentum = alg.kind == "momentum"
    beta = _operand(ir, alg.beta) if momentum else StepOperand(1.0, None)
    map_ = ret.effective_map  # lq with q = 2 is the identity
    prox = map_ == "soft_threshold" and ret.form == "prox"
    gamma = _operand(ir, ret.gamma) if map_ == "soft_threshold" else StepOperand(0.0, None)
    has_decay = decay.input is not None or decay.lit != 1.0
    used = {op for op in (alg.lr, ret.alpha, alg.beta if momentum else None,
                          ret.gamma if map_ == "soft_threshold" else None, *ir.bias.params) if isinstance(op, str)}
    inputs = tuple(_input(ir, p.name) for p in ir.backend_inputs() if p.name in used)
    return StepPlan(
        inputs=inputs,
        bias_params=tuple(_input(ir, n) for n in ir.bias.params),
        lr=lr,
        decay=decay,
        momentum=momentum,
        beta=beta,
        needs_y=ir.bias.klass != "independent",
        at_retained=alg.at == "retained" and has_decay,
        map=map_,
        base_map=map_ != "id" and not prox,
        prox=prox,
        gamma=gamma,
        kl_axis=ret.axis,
        kl_scale=float(ret.scale),
        lq=_lq(ret.q, ret.eps) if map_ == "lq" else _lq(3.0, 1e-6),
        lq_chunk=map_ == "lq" and ret.norm == "chunk",
        bias_src=bias_functions(ir, bias_params_of(ir)),
        max_dim=128,
        warps=((4096, 4), (128 * 128, 8)),
        helpers=("_step_input", "_step_vecmat", "_step_map", "_step_lq_rnorm"),
    )


__all__ = ["StepInput", "StepLq", "StepOperand", "StepPlan", "plan_step"]
