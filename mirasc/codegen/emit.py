"""LayerIR -> the generated Python module (jinja2 templates in templates/, one partial per concern).

    source = emit_module(ir, mirasc.__version__)
    path = write_module(ir, "build/", "moneta")

The templates receive plain strings, numbers and a few small helpers that render operand expressions
(an operand is a literal or a runtime parameter; see `_Operand`); all the decisions about which code to
emit are made here, from the IR, so the templates stay declarative.  The bias functions come from
mirasc.codegen.printers.torch_bias_source and are inserted verbatim.
"""

from __future__ import annotations

import keyword
import math
import os
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .. import per_head
from .._resources import resource_dir
from ..ir import LayerIR, Operand
from ..spec import Param
from ..symbolic.activations import activation
from .plan import Refusal
from .plan.linear import plan_linear
from .plan.mlp import operand_sources, plan_mlp
from .plan.step import StepPlan, plan_step
from .printers import num, torch_activation_source
from .triton import bias_params_of, input_ident, layout_of


class CodegenError(ValueError):
    """A LayerIR the code generator cannot turn into a module (a combination it does not support)."""


# Names of memory()/step() arguments: a runtime parameter may not shadow them.
_ARGUMENT_NAMES = frozenset(
    {"q", "k", "v", "state", "initial_state", "output_final_state", "chunk_size", "backend", "cu_seqlens"}
)

def _gate_act(act: str) -> tuple[str, str]:
    """The opening and closing of the call that applies a gate's activation in generated code (its torch
    function, from mirasc.symbolic.activations; nothing for the identity)."""
    fn = activation(act).torch
    return (f"{fn}(", ")") if fn else ("", "")


@dataclass(frozen=True)
class _Operand:
    """An operand of the rule (lr, alpha, beta, gamma) as generated code sees it.

    Backends hold runtime parameters as params[name] of layout [B, H, T, c] (c = 1 or V).  `at(i)`
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


def _operand(ir: LayerIR, op: Operand | None, what: str) -> _Operand | None:
    if op is None:
        return None
    if not isinstance(op, str):
        return _Operand(float(op), None)
    p = _param(ir, op, what)
    if p.kind == "const":  # the symbolic stage inlines constants; accept a name anyway
        return _Operand(float(p.value), None)
    return _Operand(None, p.name, p.kind == "gate" and p.shape == "channel", input_ident(ir, p.name))


def _param(ir: LayerIR, name: str, what: str) -> Param:
    for p in ir.params:
        if p.name == name:
            return p
    raise CodegenError(f"{ir.name}: {what} refers to {name!r}, which is not a declared parameter")


def inverse_activation(act: str, value: float) -> float:
    """The raw value r with act(r) == value: the bias / parameter that starts a gate at its init (the
    inverse in the activation's table row, mirasc.symbolic.activations)."""
    try:
        return activation(act).invert(value)
    except ValueError as exc:
        raise CodegenError(str(exc)) from None


def _check_supported(ir: LayerIR) -> None:
    """Refuse, with a plain message, the IRs this generator cannot turn into a correct module."""
    for p in ir.inputs():
        if not p.name.isidentifier() or keyword.iskeyword(p.name) or p.name in _ARGUMENT_NAMES:
            raise CodegenError(
                f"{ir.name}: parameter name {p.name!r} cannot be a keyword argument of memory()"
            )
        if p.kind == "learnable" and p.shape == "channel":
            raise CodegenError(
                f"{ir.name}: learnable {p.name!r} is per channel; learnables are one scalar per head"
            )
    ret, alg = ir.retention, ir.algorithm
    mlp = ir.memory.kind == "mlp"
    for what, op in (
        ("retention alpha", ret.alpha),
        ("momentum beta", alg.beta),
        ("elastic_net gamma", ret.gamma),
    ):
        o = _operand(ir, op, what)
        if o is not None and o.channel and mlp:
            raise CodegenError(f"{ir.name}: {what} {o.name!r} is per channel, which needs a linear memory")
    if ret.map == "lq" and ret.q <= 1.0:
        raise CodegenError(f"{ir.name}: lq retention needs q > 1, got {ret.q}")
    gamma = _operand(ir, ret.gamma, "elastic_net gamma")
    if (
        ret.map == "soft_threshold"
        and ret.form == "accumulate"
        and gamma.name is not None
        and _param(ir, gamma.name, "gamma").kind == "gate"
    ):
        # The FTRL form thresholds the base state of a chunk too, and no token's gate is defined for it.
        raise CodegenError(
            f"{ir.name}: elastic_net(form=ftrl) needs a constant or learnable gamma, "
            f"not the gate {gamma.name!r}"
        )


def _bias_source(ir: LayerIR) -> str:
    from .printers import torch_bias_source  # imported lazily: the printer is its own stage

    return torch_bias_source(ir.bias).strip("\n")


def _wrap(items: list[str], width: int = 100) -> list[str]:
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
    return lines


def _wrap_text(text: str, prefix: str, width: int = 104) -> list[str]:
    """Prefix every line of text and wrap the long ones, continuation lines indented under their start."""
    out = []
    for line in text.splitlines():
        lead = line[: len(line) - len(line.lstrip())]
        out += textwrap.wrap(
            line,
            width,
            initial_indent=prefix,
            subsequent_indent=prefix + lead + "    ",
            break_long_words=False,
            break_on_hyphens=False,
        ) or [prefix.rstrip()]
    return out


def _layer_dims(ir: LayerIR) -> list[tuple[str, str]]:
    if ir.memory.kind == "linear":
        return [("K", "V")]
    x = ir.memory.expansion
    dims = ["K"] + [f"{x}K"] * (ir.memory.depth - 1) + ["V"]
    return [(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]


def _context(ir: LayerIR, version: str) -> dict:
    """Everything the templates read (see templates/module.py.j2 and its partials)."""
    ret, alg, mem, blk = ir.retention, ir.algorithm, ir.memory, ir.block
    mlp = mem.kind == "mlp"
    momentum = alg.kind == "momentum"
    lr = _operand(ir, alg.lr, "lr")
    alpha = _operand(ir, ret.alpha, "retention alpha")
    beta = _operand(ir, alg.beta, "momentum beta")
    gamma = _operand(ir, ret.gamma, "elastic_net gamma")
    has_decay = not alpha.is_one
    at_retained = alg.at == "retained" and has_decay

    map_ = ret.map
    if map_ == "lq" and ret.q == 2.0 and ret.eps <= 1.0:
        map_ = "id"  # ||Z||_2^0 = 1: W = Z / max(1, eps) = Z
    prox = map_ == "soft_threshold" and ret.form == "prox"
    gamma_tensor = map_ == "soft_threshold" and gamma.name is not None
    # at=retained: the gradient point a_i Z_b is a per-token scaling of Z_b when no non-linear map sits
    # between (id, or prox whose base is the carried W itself); otherwise it is materialised per token.
    scale_base = at_retained and (map_ == "id" or prox)
    base_per_token = at_retained and not scale_base

    def gamma_arg(idx: str) -> str:
        return f", {gamma.bcast(idx)}" if gamma_tensor else ""

    def base_point(var: str, idx: str) -> str:
        if map_ == "id" or prox:
            return var
        return f"[_retention_map(z{gamma_arg(idx)}) for z in {var}]"

    def bias_args(idx: str) -> str:
        return "[" + ", ".join(f'params["{n}"][:, :, {idx}]' for n in ir.bias.params) + "]"

    roles: dict[str, list[str]] = {}
    for role, op in (
        ("the learning rate", lr),
        ("the retention gate", alpha if has_decay else None),
        ("the momentum decay", beta),
        ("the elastic-net threshold", gamma if map_ == "soft_threshold" else None),
    ):
        if op is not None and op.name is not None:
            roles.setdefault(op.name, []).append(role)
    for n in ir.bias.params:
        roles.setdefault(n, []).append("a parameter of the bias")

    inputs, gates, learnables, per_head_consts = [], [], [], []
    for p in ir.backend_inputs():
        layout = layout_of(p)
        role = " and ".join(roles.get(p.name, ["unused by the rule"]))
        act = p.activation or "identity"
        if p.kind == "per_head":
            text = per_head.text(p.expr)
            per_head_consts.append({"name": p.name, "text": text, "role": role,
                                    "source": per_head.torch_source(p.expr),
                                    "tensor": per_head.mentions_head(p.expr)})
            inputs.append({"name": p.name, "layout": layout, "public": False})
            continue
        if layout == "learnable":
            doc, step_doc = f"[H], {role}: a learnable scalar per head, after its {act}", "[H]"
        elif layout == "head":
            doc, step_doc = f"[B, T, H], {role}: a gate per token and head", "[B, H]"
        else:
            doc, step_doc = f"[B, T, H, V], {role}: a gate per token, head and value channel", "[B, H, V]"
        raw = None if p.init is None else num(inverse_activation(act, p.init))
        opening, closing = _gate_act(act)
        entry = {
            "name": p.name,
            "public": True,
            "layout": layout,
            "shape": p.shape,
            "doc": doc,
            "step_doc": f"{step_doc}, {role}",
            "activation": act,
            "init": p.init,
            "raw": raw,
            "rank": int(p.rank or 0),
            "act_open": opening,
            "act_close": closing,
            "width": "heads * value_dim" if layout == "channel" else "heads",
        }
        inputs.append(entry)
        (learnables if layout == "learnable" else gates).append(entry)
        if layout == "learnable" and raw is None:
            entry["raw"] = "0.0"

    dims = _layer_dims(ir)
    mats = (
        ", ".join(f"Z_{i + 1} [B, H, {a}, {b}]" for i, (a, b) in enumerate(dims)) if mlp else "Z [B, H, K, V]"
    )
    if not mlp and not momentum:
        state_doc = "a tensor Z [B, H, K, V]"
    elif not mlp:
        state_doc = "a tuple (Z, m), each [B, H, K, V]"
    else:
        state_doc = f"a tuple ({mats}{f', then m_1 .. m_{mem.depth} of the same shapes' if momentum else ''})"
    if map_ == "id":
        meaning = "Z is the memory's weights"
    elif prox:
        meaning = "Z is the thresholded weights W at a chunk boundary, S_gamma(Z) inside a chunk"
    else:
        meaning = "the memory's weights are W = map(Z) (the retention map)"
    state_doc_lines = textwrap.wrap(
        f"{state_doc[0].upper()}{state_doc[1:]}, in float32 (float64 for float64 inputs); {meaning}"
        f"{'; m are the momentum buffers' if momentum else ''}.",
        100,
    )
    n = mem.depth if mlp else 1
    names = [f"Z_{i + 1}" for i in range(n)] if mlp else ["Z"]
    if momentum:
        names += [f"m_{i + 1}" for i in range(n)] if mlp else ["m"]
    state_tuple_doc = f"{len(names)} tensors ({', '.join(names)})"

    bias_src = _bias_source(ir)
    step = plan_step(ir)
    klass = ir.bias.klass
    klass_note = {
        "independent": " (g does not depend on y: the chunked rule equals the per-token rule)",
        "affine": " (g = y - c(v), the delta-rule class)",
        "nonlinear": "",
    }[klass]
    terms = ([f"decay({alpha.name or num(alpha.lit)})"] if has_decay else []) + (
        [] if ret.map == "id" else [ret.map]
    )
    mlp_text = (
        f"depth {mem.depth}, expansion {mem.expansion}, {mem.act}"
        f"{', residual' if mem.residual else ''}{', LayerNorm' if mem.norm else ''}"
    )
    rule = (ir.rule or "(no rule text)").replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return {
        "name": ir.name,
        # the spec's path enters generated code only as an escaped literal: repr() escapes newlines and
        # control characters, the escaped double quotes cannot close the docstring it is printed in
        "source_file": repr(str(ir.source_file)).replace('"', '\\"'),
        "source_hash": ir.source_hash,
        "version": version,
        "rule": "\n".join(_wrap_text(rule, "    ")),
        "heads": blk.heads,
        "key_dim": blk.key_dim,
        "value_dim": blk.value_dim,
        "chunk": alg.chunk,
        "conv": blk.conv,
        "conv_tail": max(blk.conv - 1, 0),
        "qk_norm": blk.qk_norm,
        "out_norm": blk.out_norm,
        "out_gate": blk.out_gate,
        "learned_init": mem.init == "learned",
        "mlp": mlp,
        "memory_kind": mem.kind,
        "depth": mem.depth if mlp else 1,
        "expansion": mem.expansion,
        "act": mem.act,
        # _act and _act_grad of the MLP memory's hidden layers (printed from the activation's sympy row)
        "act_src": torch_activation_source(mem.act, grad=mem.act != "identity") if mlp and mem.depth > 1 else "",
        "residual": mlp and mem.residual,
        "norm": mlp and mem.norm,
        "n_layers": n,
        "mlp_text": mlp_text,
        "state_is_tensor": not mlp and not momentum,
        "state_doc_lines": state_doc_lines,
        "state_tuple_doc": state_tuple_doc,
        # inputs: every runtime tensor the backends read, by name in the gates dict; public_inputs: the
        # keyword arguments of memory() and step() (inputs less the per-head constants, which the module
        # computes itself for the head count it runs with)
        "inputs": inputs,
        "public_inputs": [p for p in inputs if p["public"]],
        "per_head_consts": per_head_consts,
        "gates": gates,
        "learnables": learnables,
        "kwarg_lines": _wrap([f"{p['name']}: torch.Tensor" for p in inputs if p["public"]]),
        "lr": lr,
        "lr_one": lr.is_one,
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "has_decay": has_decay,
        "momentum": momentum,
        "at_retained": at_retained,
        "scale_base": scale_base,
        "base_per_token": base_per_token,
        "map": map_,
        "prox": prox,
        "gamma_tensor": gamma_tensor,
        "retention_text": " + ".join(terms) or "none",
        "lq_q": num(ret.q),
        "lq_power": num((ret.q - 2.0) / ret.q),
        "lq_at_zero": num(0.0 if ret.q > 2.0 else math.inf),
        "lq_eps": num(ret.eps),
        # lq(norm=chunk): tokens read Z_i / n(Z_b) (the chunk's base norm), the chunk's last token Z_i / n(Z_i)
        "lq_chunk": map_ == "lq" and ret.norm == "chunk",
        "kl_axis": ret.axis,
        "kl_scale": float(ret.scale),
        "channel_coef": (alpha.channel and has_decay) or (momentum and beta.channel),
        "need_segment_products": has_decay or momentum,
        # the torch backend fills constant gates and the no-decay mask to [B, H, C, ...] tensors
        "torch_needs_bh": not has_decay or alpha.name is None or (momentum and beta.name is None),
        # an affine bias (unit Hessian) on a matrix memory without a map: the torch backend solves chunks
        # under a block exactly in the WY form (one triangular system per block, per column if per channel)
        "torch_wy": not mlp and map_ == "id" and klass == "affine",
        "torch_wy_channel": (alpha.channel and has_decay) or (momentum and beta.channel) or lr.channel,
        "gamma_arg": gamma_arg,
        "base_point": base_point,
        "bias_args": bias_args,
        "bias_src": bias_src,
        "bias_klass": klass,
        "bias_klass_note": klass_note,
        "bias_text_lines": _wrap_text(ir.bias.text or ir.bias.name, "# "),
        "bias_params": bias_params_of(ir),
        "need_math": "math." in bias_src,
        # the fused decode step's plan (templates/triton_step.py.j2), None when the layer has none
        "step": step if isinstance(step, StepPlan) else None,
        **_triton_context(ir),
        **_triton_mlp_context(ir),
    }


def _triton_context(ir: LayerIR) -> dict:
    """The matrix-memory kernels' plan as `linear` (templates/triton_linear_*.py.j2; None when refused),
    and the few top-level keys other templates read (api.py.j2, triton_step.py.j2)."""
    plan = plan_linear(ir)
    if isinstance(plan, Refusal):
        return {"linear": None, "triton": False, "triton_step": False, "triton_reason": plan.reason}
    # With chunk kernels but no fused step, triton_reason is what step(backend="triton") says.
    step = plan_step(ir)
    has_step = isinstance(step, StepPlan)
    return {
        "linear": plan, "triton": True, "triton_reason": "" if has_step else step.reason,
        "step_inputs": _step_inputs(step) if has_step else [], "triton_step": has_step,
        "needs_y": plan.needs_y, "triton_eta": plan.eta_source, "triton_alpha": plan.alpha_source,
        "triton_beta": plan.beta_source, "triton_bias_args": list(plan.bias_args),
    }


def _triton_mlp_context(ir: LayerIR) -> dict:
    """The MLP memory's Triton kernels: their plan as `mlp_plan` (None when refused) and the top-level keys
    other templates read (triton_mlp, triton_reason, the launcher's operand expressions).

    Overrides triton_reason for MLP specs: the matrix-memory family's reason does not apply to them.
    """
    if ir.memory.kind != "mlp":
        return {"triton_mlp": False, "mlp_plan": None}
    plan = plan_mlp(ir)
    if isinstance(plan, Refusal):
        return {"triton_mlp": False, "mlp_plan": None, "triton_reason": plan.reason}
    return {"triton_mlp": True, "mlp_plan": plan, "triton_reason": "the fused decode step covers matrix memories only",
            **operand_sources(ir)}


def _step_inputs(step: StepPlan) -> list[dict]:
    """The runtime inputs the fused step kernel reads (lr, decay, bias parameters), each once, in keyword
    order, for api.py.j2: [{name, public, layout}] with layout "head" ([B, H]), "channel" ([B, H, V]) or
    "learnable" ([H])."""
    return [{"name": p.name, "public": p.public, "layout": p.layout} for p in step.inputs]


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def emit_module(ir: LayerIR, mirasc_version: str) -> str:
    """The generated module's source for one layer (self-contained: imports torch, math, typing)."""
    _check_supported(ir)
    return _environment().get_template("module.py.j2").render(**_context(ir, mirasc_version))


def write_module(ir: LayerIR, out_dir: str | os.PathLike, stem: str) -> Path:
    """Write `<out_dir>/<stem>.py` atomically (a temporary file in out_dir, then os.replace)."""
    from .. import __version__

    source = emit_module(ir, __version__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{stem}.py"
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


__all__ = ["CodegenError", "emit_module", "inverse_activation", "write_module"]
