"""The fused decode step's plan: what templates/triton_step.py.j2 (matrix memories) and
templates/triton_step_mlp.py.j2 (MLP memories) generate for a layer, or why they cannot.

The step kernel applies one token of a matrix memory's chunk rule (docs/semantics.md, "Chunks" and "The
decode step"): y = k map(Z_b), g = eta dL/dy(y, v), m' = beta m + k^T g (momentum), Z' = alpha Z - m'
(gd: - k^T g), o = q map(Z'). Its variants are tl.constexpr flags (NEEDS_Y, AT_RETAINED, MOMENTUM, MAP
and the map's constants, per-channel operands) and absent tensors (None): the plan holds the values the
launcher passes for them, and the one table of launch settings. It decides on its own which layers it
covers, independently of the chunk kernels' plan (plan/linear.py).

The MLP step kernel (`StepMlpPlan`) applies one token of an MLP memory's chunk rule, M(x) = [x +] [LN](z_L)
of depth 1 or 2 with W_l = map(Z_l) (the identity or Moneta's lq map): the forward at the chunk's base
W_b, g = eta dL/dy, the per-layer gradients by backpropagation through the MLP, Z' = alpha Z - G
(momentum: m' = beta m + G, Z' = alpha Z - m'), and o = M(map(Z'); q), tiled over the hidden columns with
the weights read from and written to global memory.
"""
from __future__ import annotations

import re
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


@dataclass(frozen=True)
class StepMlpPlan:
    """The MLP step kernel's variant: the operands as in StepPlan (retention none or decay, Moneta's lq
    map, and the kl (key axis), bregman and elastic_net maps), and the memory's shape: depth 1 (one
    [K, V] tile) or 2 (W_1 [K, X], W_2 [X, V], looped over BX hidden columns at a time)."""

    inputs: tuple[StepInput, ...]  # every input the kernel reads, each once, in keyword order
    bias_params: tuple[StepInput, ...]  # the bias's non-constant parameters, in _bias_grad's order
    lr: StepOperand
    decay: StepOperand  # the literal 1.0 without decay
    momentum: bool  # the state is (Z_1..Z_L, m_1..m_L): m' = beta m + G, Z' = alpha Z - m'
    beta: StepOperand  # the momentum decay (the literal 1.0 for gd: unused)
    needs_y: bool  # the bias gradient depends on y = M(W_b; k)
    at_retained: bool  # the gradient point is alpha W_b (every layer's pre-activation scaled by alpha)
    map: str  # "id", "lq" (W_l = Z_l / n(Z_l)), "softmax" (key axis), "sigmoid" or "soft_threshold"
    lq: StepLq  # the lq map's constants (unused without it)
    lq_chunk: bool  # lq(norm=chunk): a token inside a chunk reads Z' / n(Z_b), the chunk's last Z' / n(Z')
    base_map: bool  # y reads map(Z_b) for softmax / sigmoid / soft_threshold (not form=retain: its base is W)
    prox: bool  # elastic_net(form=retain): the token that ends a chunk carries W = S_gamma(Z')
    gamma: StepOperand  # the soft threshold (the literal 0.0 without elastic_net)
    kl_scale: float
    depth: int  # 1 or 2
    act: str  # the hidden activation (depth 2): _tl_act / _tl_dact
    norm: bool  # M ends in a LayerNorm without affine parameters (eps 1e-5)
    residual: bool  # M adds its input (K = V)
    bias_src: str  # the @triton.jit _bias_grad (printed by the MLP chunk kernels too; see the template)
    activation_src: str  # the @triton.jit _tl_act / _tl_dact / _tl_d2act ("" at depth 1)
    max_dim: int  # the largest K and V: a [BK, BV] tile (depth 1), [BK, BX] and [BX, BV] tiles (depth 2)
    bx: int  # hidden columns per tile (depth 2)
    # launch settings: (largest tile, num_warps), the first row that fits is used; the tile is BK * BV at
    # depth 1, BX * max(BK, BV) at depth 2
    warps: tuple[tuple[int, int], ...]
    helpers: tuple[str, ...]  # the mirasc.codegen.triton_lib functions the kernel calls
    pasted: tuple[str, ...]  # library functions the MLP chunk kernels paste into the module already

    @property
    def chunk_end(self) -> bool:
        """Whether the kernel needs to know that the token ends its chunk (a tl.constexpr CHUNK_END)."""
        return self.lq_chunk or self.prox

    @property
    def layers(self) -> tuple[int, ...]:
        """The weight matrices' numbers 1..depth (the kernel's and launcher's per-layer arguments)."""
        return tuple(range(1, self.depth + 1))

    def names(self, prefix: str, suffix: str = "") -> str:
        """The per-layer argument names of generated code, e.g. "z1, z2" or "z1_ptr, z2_ptr"."""
        return ", ".join(f"{prefix}{n}{suffix}" for n in self.layers)

    def names_tuple(self, prefix: str) -> str:
        """The per-layer names as a tuple display, e.g. "(z1,)" or "(z1, z2)"."""
        return f"({self.names(prefix)}{',' if self.depth == 1 else ''})"

    @property
    def forward(self) -> bool:
        """Whether the kernel computes M(W_b; k) (the bias reads y, or the LayerNorm's backward needs z_L)."""
        return self.needs_y or self.norm

    @property
    def library(self) -> str:
        from .. import triton_lib

        return triton_lib.source(self.helpers, exclude=self.pasted)


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


def _rule_fields(ir: LayerIR, gamma=None) -> dict:
    """The fields both step plans share: the inputs the kernel reads (each once), the bias parameters,
    the learning rate, the decay and the momentum gate as operands, and the gradient point."""
    ret, alg = ir.retention, ir.algorithm
    decay = _operand(ir, ret.alpha)
    momentum = alg.kind == "momentum"
    has_decay = decay.input is not None or decay.lit != 1.0
    used = {op for op in (alg.lr, ret.alpha, alg.beta if momentum else None, gamma, *ir.bias.params)
            if isinstance(op, str)}
    return {
        "inputs": tuple(_input(ir, p.name) for p in ir.backend_inputs() if p.name in used),
        "bias_params": tuple(_input(ir, n) for n in ir.bias.params),
        "lr": _operand(ir, alg.lr),
        "decay": decay,
        "momentum": momentum,
        "beta": _operand(ir, alg.beta) if momentum else StepOperand(1.0, None),
        "needs_y": ir.bias.klass != "independent",
        "at_retained": alg.at == "retained" and has_decay,
    }


def _plan_step_mlp(ir: LayerIR) -> StepMlpPlan | Refusal:
    from ..printers import triton_activation_source
    from ..triton import bias_functions, bias_params_of
    from .mlp import plan_mlp

    mem, ret = ir.memory, ir.retention
    if mem.depth > 2:
        return Refusal(f"the fused decode step covers MLP memories of depth 1 and 2, got depth {mem.depth}")
    map_ = ret.effective_map  # lq with q = 2 is the identity
    if map_ == "softmax" and ret.axis != "key":
        # (short: the generated module prints it inside a 110-column line)
        return Refusal(f"the MLP step kernel covers kl over the key axis, not over {ret.axis!r}")
    threshold = map_ == "soft_threshold"
    prox = threshold and ret.form == "prox"
    rule = _rule_fields(ir, ret.gamma if threshold else None)
    if map_ == "lq" and rule["at_retained"]:
        # the gradient point map(alpha Z_b) is then no scaling of the base
        return Refusal("the fused decode step of an MLP memory has no lq map with at=retained and a decay")
    mlp = plan_mlp(ir)
    pasted = () if isinstance(mlp, Refusal) else tuple(re.findall(r"^def (\w+)\(", mlp.library_src, re.MULTILINE))
    return StepMlpPlan(
        **rule,
        map=map_,
        lq=_lq(ret.q, ret.eps) if map_ == "lq" else _lq(3.0, 1e-6),
        lq_chunk=map_ == "lq" and ret.norm == "chunk",
        base_map=map_ in ("softmax", "sigmoid", "soft_threshold") and not prox,
        prox=prox,
        gamma=_operand(ir, ret.gamma) if threshold else StepOperand(0.0, None),
        kl_scale=float(ret.scale),
        depth=mem.depth,
        act=mem.act,
        norm=bool(mem.norm),
        residual=bool(mem.residual),
        bias_src=bias_functions(ir, bias_params_of(ir)),
        activation_src=triton_activation_source(mem.act) if mem.depth > 1 else "",
        max_dim=128,
        bx=32,
        warps=((4096, 4), (128 * 128, 8)),
        helpers=("_step_operand", "_step_input", "_step_vecmat", "_step_ln", "_step_ln_vjp", "_step_lq_rnorm",
                 "_step_lq_r", "_step_tile", "_step_base", "_step_base_or", "_step_retain", "_step_update",
                 "_step_lq_sum", "_step_map", "_step_softmax_rows"),
        pasted=pasted,
    )


def plan_step(ir: LayerIR) -> StepPlan | StepMlpPlan | Refusal:
    """The step kernel's plan, or the one reason the layer has none."""
    from ..triton import bias_functions, bias_params_of

    if ir.bias.vjp is None:
        return Refusal("the bias carries no derived Triton functions (no VJP)")
    if ir.memory.kind == "mlp":
        return _plan_step_mlp(ir)
    if ir.memory.kind != "linear":
        return Refusal(f"the fused decode step has no kernel for '{ir.memory.kind}' memories")
    ret = ir.retention
    map_ = ret.effective_map  # lq with q = 2 is the identity
    prox = map_ == "soft_threshold" and ret.form == "prox"
    gamma = _operand(ir, ret.gamma) if map_ == "soft_threshold" else StepOperand(0.0, None)
    return StepPlan(
        **_rule_fields(ir, ret.gamma if map_ == "soft_threshold" else None),
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


__all__ = ["StepInput", "StepLq", "StepMlpPlan", "StepOperand", "StepPlan", "plan_step"]
