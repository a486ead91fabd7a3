"""The module plan: what every template outside the Triton kernel families reads, decided from the IR.

`plan_module(ir, version)` returns a `ModulePlan`: the layer's identity and docstrings, the block, the
memory, the state layout, the runtime inputs, the update rule as the backends print it (`RulePlan`, with
the small helpers that render an operand at a time index), the torch backend's variants, the bias code,
and which fused kernels the layer has (`KernelChoice`: the Triton family, the fused step, and the one
reason when there is none). Templates read it as `m`.
"""
from __future__ import annotations

import keyword
import math
import textwrap
from dataclasses import dataclass

from ... import per_head
from ...ir import LayerIR, Operand
from ...spec import Param
from ...symbolic.activations import activation
from ..printers import num, torch_activation_source
from ..triton import BiasParam, bias_params_of, input_ident, layout_of, operand_source
from . import Refusal
from .linear import LinearPlan
from .mlp import MlpPlan
from .mlp_map import MlpMapPlan
from .step import StepMlpPlan, StepPlan

# Names of memory()/step() arguments: a runtime parameter may not shadow them.
ARGUMENT_NAMES = frozenset(
    {"q", "k", "v", "state", "initial_state", "output_final_state", "chunk_size", "backend", "cu_seqlens"}
)


class CodegenError(ValueError):
    """A LayerIR the code generator cannot turn into a module (a combination it does not support)."""


@dataclass(frozen=True)
class OperandPlan:
    """An operand of the rule (lr, alpha, beta, gamma) as generated code sees it.

    Backends hold runtime parameters as params[name] of layout [B, H, T, c] (c = 1 or V). `at(i)`
    indexes the time axis ([B, H, c] or [B, H, C, c]); `bcast(i)` adds an axis so the value broadcasts
    over a weight matrix [B, H, d_in, d_out] (or per-token matrices); `chunk(i)` is always a tensor
    (a literal is filled in), for the coefficient products of the torch backend.
    """

    lit: float | None
    name: str | None
    channel: bool = False
    ident: str | None = None  # the identifier kernels use for the input (triton.input_ident)

    @property
    def is_one(self) -> bool:
        return self.lit == 1.0

    def at(self, idx: str) -> str:
        return num(self.lit) if self.name is None else f'params["{self.name}"][:, :, {idx}]'

    def bcast(self, idx: str) -> str:
        return num(self.lit) if self.name is None else f'params["{self.name}"][:, :, {idx}, None]'

    def chunk(self, idx: str) -> str:
        if self.name is None:
            return f"qc.new_full((B, H, e - s, 1), {num(self.lit)})"
        return f'params["{self.name}"][:, :, {idx}]'


@dataclass(frozen=True)
class BlockPlan:
    heads: int
    key_dim: int
    value_dim: int
    conv: int
    conv_tail: int  # conv - 1 (the tokens a decode step keeps), 0 without a conv
    qk_norm: bool
    out_norm: bool
    out_gate: bool


@dataclass(frozen=True)
class MemoryPlan:
    kind: str  # "linear" or "mlp"
    mlp: bool
    depth: int  # 1 for a matrix memory
    expansion: int
    act: str
    act_src: str  # _act / _act_grad of an MLP's hidden layers, printed from the activation's sympy row
    residual: bool
    norm: bool
    n_layers: int  # weight matrices per state
    text: str  # "depth 2, expansion 4, gelu, residual, LayerNorm"
    learned_init: bool


@dataclass(frozen=True)
class StatePlan:
    is_tensor: bool  # a matrix memory without momentum carries one tensor, not a tuple
    doc_lines: tuple[str, ...]
    tuple_doc: str


@dataclass(frozen=True)
class InputPlan:
    """A runtime input of memory() / step(): a gate, a learnable scalar per head, or (public False) a
    per-head constant the module computes itself."""

    name: str
    layout: str  # "head", "channel" or "learnable" (mirasc.codegen.triton.layout_of)
    public: bool
    shape: str | None = None
    doc: str = ""
    step_doc: str = ""
    activation: str = "identity"
    init: float | None = None
    raw: str | None = None  # the raw value that starts the gate at init (through its activation)
    rank: int = 0
    act_open: str = ""
    act_close: str = ""
    width: str = "heads"


@dataclass(frozen=True)
class PerHeadConstPlan:
    name: str
    text: str
    role: str
    source: str
    tensor: bool  # the expression mentions the head index (else a scalar)


@dataclass(frozen=True)
class RulePlan:
    """The update rule as the torch and reference backends print it (docs/semantics.md)."""

    chunk: int
    lr: OperandPlan
    lr_one: bool
    alpha: OperandPlan
    beta: OperandPlan | None
    gamma: OperandPlan | None
    has_decay: bool
    momentum: bool
    at_retained: bool
    scale_base: bool  # at=retained by scaling the base pass (no non-linear map in between)
    base_per_token: bool  # at=retained through a map: the point is materialised per token
    map: str  # id, lq, softmax, sigmoid, soft_threshold
    prox: bool  # elastic_net(form=retain)
    gamma_tensor: bool
    retention_text: str
    lq_q: str
    lq_power: str
    lq_at_zero: str
    lq_eps: str
    lq_chunk: bool  # lq(norm=chunk): tokens read Z_i / n(Z_b), a chunk's last token its own map(Z_i)
    kl_axis: str | None
    kl_scale: float
    channel_coef: bool
    need_segment_products: bool
    bias_param_names: tuple[str, ...]

    def gamma_arg(self, idx: str) -> str:
        return f", {self.gamma.bcast(idx)}" if self.gamma_tensor else ""

    def base_point(self, var: str, idx: str) -> str:
        if self.map == "id" or self.prox:
            return var
        return f"[_retention_map(z{self.gamma_arg(idx)}) for z in {var}]"

    def bias_args(self, idx: str) -> str:
        return "[" + ", ".join(f'params["{n}"][:, :, {idx}]' for n in self.bias_param_names) + "]"


@dataclass(frozen=True)
class TorchPlan:
    needs_bh: bool  # constant gates and the no-decay mask are filled to [B, H, C, ...] tensors
    wy: bool  # affine bias on a matrix memory without a map: chunks under a block in the WY form
    wy_channel: bool  # one triangular system per value column (per-channel lr, decay or momentum)


@dataclass(frozen=True)
class BiasPlan:
    src: str  # the torch bias functions, printed from the derivation
    klass: str
    klass_note: str
    text_lines: tuple[str, ...]
    need_math: bool
    params: tuple[BiasParam, ...]  # its non-constant parameters, in the order of the bias functions


@dataclass(frozen=True)
class KernelChoice:
    """Which fused kernels the layer has: the one compile-time decision (`choose_kernels`) that templates
    and the generated module read. (At run time the generated `_triton_usable` adds what depends on the
    call: CUDA tensors, head dims and dtypes against the family's launch table.)

    family is "linear", "mlp", "mlp_map" (an MLP memory with a non-linear map: the torch backend with
    its per-token read-out in Triton, mirasc.codegen.plan.mlp_map) or None; step says whether the fused
    decode step exists (its plan decides on its own: a layer may have the step without the chunk
    kernels); reason is what backend="triton"
    says for the chunk kernels (family None, else ""), step_reason what step() says (no step, else "").
    eta, alpha, beta, gamma and bias_args are the launcher's operand expressions (contiguous fp32 tensors,
    None for an absent decay or momentum gate; gamma is the elastic net's threshold of the matrix
    kernels)."""

    family: str | None
    step: bool
    reason: str
    step_reason: str
    eta: str | None = None
    alpha: str | None = None
    beta: str | None = None
    gamma: str | None = None
    bias_args: tuple[str, ...] = ()

    @property
    def linear(self) -> bool:
        return self.family == "linear"

    @property
    def mlp(self) -> bool:
        return self.family == "mlp"

    @property
    def mlp_map(self) -> bool:
        return self.family == "mlp_map"

    @property
    def label(self) -> str | None:
        """What the generated module's TRITON_KERNELS says (None: no fused chunk kernels)."""
        return {"linear": "matrix", "mlp": "MLP", "mlp_map": "MLP map read-out"}.get(self.family or "")


@dataclass(frozen=True)
class ModulePlan:
    name: str
    source_file: str  # an escaped literal, safe inside a docstring
    source_hash: str
    version: str
    rule_text: str
    block: BlockPlan
    memory: MemoryPlan
    state: StatePlan
    inputs: tuple[InputPlan, ...]
    public_inputs: tuple[InputPlan, ...]
    gates: tuple[InputPlan, ...]
    learnables: tuple[InputPlan, ...]
    per_head_consts: tuple[PerHeadConstPlan, ...]
    kwarg_lines: tuple[str, ...]
    rule: RulePlan
    torch: TorchPlan
    bias: BiasPlan
    kernels: KernelChoice


def _param(ir: LayerIR, name: str, what: str) -> Param:
    for p in ir.params:
        if p.name == name:
            return p
    raise CodegenError(f"{ir.name}: {what} refers to {name!r}, which is not a declared parameter")


def operand(ir: LayerIR, op: Operand | None, what: str) -> OperandPlan | None:
    if op is None:
        return None
    if not isinstance(op, str):
        return OperandPlan(float(op), None)
    p = _param(ir, op, what)
    if p.kind == "const":  # the symbolic stage inlines constants; accept a name anyway
        return OperandPlan(float(p.value), None)
    return OperandPlan(None, p.name, p.kind == "gate" and p.shape == "channel", input_ident(ir, p.name))


def inverse_activation(act: str, value: float) -> float:
    """The raw value r with act(r) == value: the bias / parameter that starts a gate at its init (the
    inverse in the activation's table row, mirasc.symbolic.activations)."""
    try:
        return activation(act).invert(value)
    except ValueError as exc:
        raise CodegenError(str(exc)) from None


def gate_call(act: str) -> tuple[str, str]:
    """The opening and closing of the call that applies a gate's activation in generated code (its torch
    function, from mirasc.symbolic.activations; nothing for the identity)."""
    fn = activation(act).torch
    return (f"{fn}(", ")") if fn else ("", "")


def check_supported(ir: LayerIR) -> None:
    """Refuse, with a plain message, the IRs this generator cannot turn into a correct module."""
    for p in ir.inputs():
        if not p.name.isidentifier() or keyword.iskeyword(p.name) or p.name in ARGUMENT_NAMES:
            raise CodegenError(
                f"{ir.name}: parameter name {p.name!r} cannot be a keyword argument of memory()"
            )
        if p.kind == "learnable" and p.shape == "channel":
            raise CodegenError(
                f"{ir.name}: learnable {p.name!r} is per channel; learnables are one scalar per head"
            )
    ret, alg = ir.retention, ir.algorithm
    mlp = ir.memory.kind == "mlp"
    for what, op in (("retention alpha", ret.alpha), ("momentum beta", alg.beta), ("elastic_net gamma", ret.gamma)):
        o = operand(ir, op, what)
        if o is not None and o.channel and mlp:
            raise CodegenError(f"{ir.name}: {what} {o.name!r} is per channel, which needs a linear memory")
    if ret.map == "lq" and ret.q <= 1.0:
        raise CodegenError(f"{ir.name}: lq retention needs q > 1, got {ret.q}")
    gamma = operand(ir, ret.gamma, "elastic_net gamma")
    if (ret.map == "soft_threshold" and ret.form == "accumulate" and gamma.name is not None
            and _param(ir, gamma.name, "gamma").kind == "gate"):
        # The FTRL form thresholds the base state of a chunk too, and no token's gate is defined for it.
        raise CodegenError(
            f"{ir.name}: elastic_net(form=ftrl) needs a constant or learnable gamma, not the gate {gamma.name!r}"
        )


def wrap(items: list[str], width: int = 100) -> tuple[str, ...]:
    """Join items with ", " into lines no longer than width (each line ends with a comma)."""
    lines, line = [], ""
    for item in items:
        piece = f"{item},"
        if line and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}" if line else piece
    if line:
        lines.append(line)
    return tuple(lines)


def wrap_text(text: str, prefix: str, width: int = 104) -> tuple[str, ...]:
    """Prefix every line of text and wrap the long ones, continuation lines indented under their start."""
    out: list[str] = []
    for line in text.splitlines():
        lead = line[: len(line) - len(line.lstrip())]
        out += textwrap.wrap(line, width, initial_indent=prefix, subsequent_indent=prefix + lead + "    ",
                             break_long_words=False, break_on_hyphens=False) or [prefix.rstrip()]
    return tuple(out)


def layer_dims(ir: LayerIR) -> list[tuple[str, str]]:
    if ir.memory.kind == "linear":
        return [("K", "V")]
    x = ir.memory.expansion
    dims = ["K"] + [f"{x}K"] * (ir.memory.depth - 1) + ["V"]
    return [(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]


def _rule(ir: LayerIR) -> RulePlan:
    ret, alg = ir.retention, ir.algorithm
    lr = operand(ir, alg.lr, "lr")
    alpha = operand(ir, ret.alpha, "retention alpha")
    beta = operand(ir, alg.beta, "momentum beta")
    gamma = operand(ir, ret.gamma, "elastic_net gamma")
    has_decay = not alpha.is_one
    momentum = alg.kind == "momentum"
    at_retained = alg.at == "retained" and has_decay
    map_ = ret.effective_map  # lq with q = 2 is the identity
    prox = map_ == "soft_threshold" and ret.form == "prox"
    # at=retained: the gradient point a_i Z_b is a per-token scaling of Z_b when no non-linear map sits
    # between (id, or prox whose base is the carried W itself); otherwise it is materialised per token.
    scale_base = at_retained and (map_ == "id" or prox)
    terms = ([f"decay({alpha.name or num(alpha.lit)})"] if has_decay else []) + ([] if ret.map == "id" else [ret.map])
    return RulePlan(
        chunk=alg.chunk, lr=lr, lr_one=lr.is_one, alpha=alpha, beta=beta, gamma=gamma, has_decay=has_decay,
        momentum=momentum, at_retained=at_retained, scale_base=scale_base,
        base_per_token=at_retained and not scale_base, map=map_, prox=prox,
        gamma_tensor=map_ == "soft_threshold" and gamma.name is not None,
        retention_text=" + ".join(terms) or "none",
        lq_q=num(ret.q), lq_power=num((ret.q - 2.0) / ret.q), lq_at_zero=num(0.0 if ret.q > 2.0 else math.inf),
        lq_eps=num(ret.eps), lq_chunk=map_ == "lq" and ret.norm == "chunk", kl_axis=ret.axis, kl_scale=float(ret.scale),
        channel_coef=(alpha.channel and has_decay) or (momentum and beta.channel),
        need_segment_products=has_decay or momentum,
        bias_param_names=tuple(ir.bias.params),
    )


def _inputs(ir: LayerIR, rule: RulePlan) -> tuple[list[InputPlan], list[PerHeadConstPlan]]:
    roles: dict[str, list[str]] = {}
    for role, op in (("the learning rate", rule.lr), ("the retention gate", rule.alpha if rule.has_decay else None),
                     ("the momentum decay", rule.beta),
                     ("the elastic-net threshold", rule.gamma if rule.map == "soft_threshold" else None)):
        if op is not None and op.name is not None:
            roles.setdefault(op.name, []).append(role)
    for n in ir.bias.params:
        roles.setdefault(n, []).append("a parameter of the bias")
    inputs, consts = [], []
    for p in ir.backend_inputs():
        layout = layout_of(p)
        role = " and ".join(roles.get(p.name, ["unused by the rule"]))
        act = p.activation or "identity"
        if p.kind == "per_head":
            consts.append(PerHeadConstPlan(p.name, per_head.text(p.expr), role, per_head.torch_source(p.expr),
                                           per_head.mentions_head(p.expr)))
            inputs.append(InputPlan(p.name, layout, public=False))
            continue
        if layout == "learnable":
            doc, step_doc = f"[H], {role}: a learnable scalar per head, after its {act}", "[H]"
        elif layout == "head":
            doc, step_doc = f"[B, T, H], {role}: a gate per token and head", "[B, H]"
        else:
            doc, step_doc = f"[B, T, H, V], {role}: a gate per token, head and value channel", "[B, H, V]"
        raw = None if p.init is None else num(inverse_activation(act, p.init))
        if layout == "learnable" and raw is None:
            raw = "0.0"
        opening, closing = gate_call(act)
        inputs.append(InputPlan(
            p.name, layout, public=True, shape=p.shape, doc=doc, step_doc=f"{step_doc}, {role}", activation=act,
            init=p.init, raw=raw, rank=int(p.rank or 0), act_open=opening, act_close=closing,
            width="heads * value_dim" if layout == "channel" else "heads"))
    return inputs, consts


def _state(ir: LayerIR, rule: RulePlan) -> StatePlan:
    mem, momentum = ir.memory, rule.momentum
    mlp = mem.kind == "mlp"
    dims = layer_dims(ir)
    mats = ", ".join(f"Z_{i + 1} [B, H, {a}, {b}]" for i, (a, b) in enumerate(dims)) if mlp else "Z [B, H, K, V]"
    if not mlp and not momentum:
        state_doc = "a tensor Z [B, H, K, V]"
    elif not mlp:
        state_doc = "a tuple (Z, m), each [B, H, K, V]"
    else:
        state_doc = f"a tuple ({mats}{f', then m_1 .. m_{mem.depth} of the same shapes' if momentum else ''})"
    if rule.map == "id":
        meaning = "Z is the memory's weights"
    elif rule.prox:
        meaning = "Z is the thresholded weights W at a chunk boundary, S_gamma(Z) inside a chunk"
    else:
        meaning = "the memory's weights are W = map(Z) (the retention map)"
    doc_lines = textwrap.wrap(
        f"{state_doc[0].upper()}{state_doc[1:]}, in float32 (float64 for float64 inputs); {meaning}"
        f"{'; m are the momentum buffers' if momentum else ''}.", 100)
    n = mem.depth if mlp else 1
    names = [f"Z_{i + 1}" for i in range(n)] if mlp else ["Z"]
    if momentum:
        names += [f"m_{i + 1}" for i in range(n)] if mlp else ["m"]
    return StatePlan(is_tensor=not mlp and not momentum, doc_lines=tuple(doc_lines),
                     tuple_doc=f"{len(names)} tensors ({', '.join(names)})")


def _memory(ir: LayerIR) -> MemoryPlan:
    mem = ir.memory
    mlp = mem.kind == "mlp"
    return MemoryPlan(
        kind=mem.kind, mlp=mlp, depth=mem.depth if mlp else 1, expansion=mem.expansion, act=mem.act,
        act_src=torch_activation_source(mem.act, grad=mem.act != "identity") if mlp and mem.depth > 1 else "",
        residual=mlp and mem.residual, norm=mlp and mem.norm, n_layers=mem.depth if mlp else 1,
        text=(f"depth {mem.depth}, expansion {mem.expansion}, {mem.act}"
              f"{', residual' if mem.residual else ''}{', LayerNorm' if mem.norm else ''}"),
        learned_init=mem.init == "learned")


def _bias(ir: LayerIR) -> BiasPlan:
    from ..printers import torch_bias_source

    src = torch_bias_source(ir.bias).strip("\n")
    klass = ir.bias.klass
    note = {"independent": " (g does not depend on y: the chunked rule equals the per-token rule)",
            "affine": " (g = y - c(v), the delta-rule class)", "nonlinear": ""}[klass]
    return BiasPlan(src=src, klass=klass, klass_note=note, text_lines=wrap_text(ir.bias.text or ir.bias.name, "# "),
                    need_math="math." in src, params=bias_params_of(ir))


def choose_kernels(ir: LayerIR, linear: LinearPlan | Refusal, mlp: MlpPlan | Refusal | None,
                   step: StepPlan | StepMlpPlan | Refusal, mlp_map: MlpMapPlan | Refusal | None = None
                   ) -> KernelChoice:
    """The one decision of which fused kernels a layer gets, from its family plans (each a plan or the
    one reason it has none): the memory's own family (matrix or MLP; an MLP with a non-linear map has
    the map read-out family instead), and the fused decode step."""
    family = "mlp_map" if mlp_map is not None else "mlp" if ir.memory.kind == "mlp" else "linear"
    family_plan = {"mlp_map": mlp_map, "mlp": mlp, "linear": linear}[family]
    has_step = isinstance(step, (StepPlan, StepMlpPlan))
    step_reason = "" if has_step else step.reason
    if isinstance(family_plan, Refusal):
        return KernelChoice(None, has_step, family_plan.reason, step_reason)
    alg, ret = ir.algorithm, ir.retention
    return KernelChoice(
        family=family, step=has_step, reason="",
        step_reason=step_reason,
        eta=operand_source(ir, alg.lr, "eta"), alpha=operand_source(ir, ret.alpha, "alpha"),
        beta=operand_source(ir, alg.beta, "beta") if alg.kind == "momentum" else None,
        gamma=(operand_source(ir, ret.gamma, "gamma")
               if ir.memory.kind == "linear" and ret.effective_map == "soft_threshold" else None),
        bias_args=tuple(f"gates[{p.public!r}].float().contiguous()" for p in bias_params_of(ir)))


def plan_module(ir: LayerIR, version: str, kernels: KernelChoice) -> ModulePlan:
    """The module plan of a layer; `kernels` is the fused-kernel choice (`choose_kernels`)."""
    check_supported(ir)
    blk = ir.block
    rule = _rule(ir)
    inputs, consts = _inputs(ir, rule)
    text = (ir.rule or "(no rule text)").replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    mlp = ir.memory.kind == "mlp"
    return ModulePlan(
        name=ir.name,
        # the spec's path enters generated code only as an escaped literal: repr() escapes newlines and
        # control characters, the escaped double quotes cannot close the docstring it is printed in
        source_file=repr(str(ir.source_file)).replace('"', '\\"'),
        source_hash=ir.source_hash,
        version=version,
        rule_text="\n".join(wrap_text(text, "    ")),
        block=BlockPlan(heads=blk.heads, key_dim=blk.key_dim, value_dim=blk.value_dim, conv=blk.conv,
                        conv_tail=max(blk.conv - 1, 0), qk_norm=blk.qk_norm, out_norm=blk.out_norm,
                        out_gate=blk.out_gate),
        memory=_memory(ir),
        state=_state(ir, rule),
        # inputs: every runtime tensor the backends read, by name in the gates dict; public_inputs: the
        # keyword arguments of memory() and step() (inputs less the per-head constants, which the module
        # computes itself for the head count it runs with)
        inputs=tuple(inputs),
        public_inputs=tuple(p for p in inputs if p.public),
        gates=tuple(p for p in inputs if p.public and p.layout != "learnable"),
        learnables=tuple(p for p in inputs if p.public and p.layout == "learnable"),
        per_head_consts=tuple(consts),
        kwarg_lines=wrap([f"{p.name}: torch.Tensor" for p in inputs if p.public]),
        rule=rule,
        torch=TorchPlan(
            needs_bh=not rule.has_decay or rule.alpha.name is None or (rule.momentum and rule.beta.name is None),
            wy=not mlp and rule.map == "id" and ir.bias.klass == "affine",
            wy_channel=((rule.alpha.channel and rule.has_decay) or (rule.momentum and rule.beta.channel)
                        or rule.lr.channel)),
        bias=_bias(ir),
        kernels=kernels,
    )
