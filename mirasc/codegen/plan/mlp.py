"""The plan of the Triton kernels for MLP memories (templates/triton_mlp*.py.j2).

The kernels cover an MLP memory M(x) = [x +] [LN](z_L) of depth 1 to 4 (any expansion, activation gelu,
silu, relu, tanh or identity), any derived bias, retention `none`, `decay` (a per-head gate, a learnable
or a constant) and Moneta's `lq` map (with or without decay), gd and momentum, at=previous and (without
a non-identity map) at=retained, chunk sizes 1 to 64. `plan_mlp` returns an `MlpPlan` (every variant
and launch decision the templates read) or a `Refusal` naming what they do not cover (the generated
module then runs those layers on the torch backend, and backend="auto" picks it by itself). The kernels'
decomposition and design are described in docs/kernels-mlp.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...ir import LayerIR
from .. import triton_lib
from ..printers import triton_activation_source
from ..triton import BiasParam, bias_functions, bias_params_of, eta_is_channel
from . import Refusal

MIN_CHUNK = 1  # chunks under 16 tokens run in tiles of 16 rows, `chunk` of them valid per pass
MAX_CHUNK = 64  # [BT, BT] and [BT, tile] register tiles beyond this spill registers
MAX_DEPTH = 4
ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")


@dataclass(frozen=True)
class Layer:
    """Weight matrix W_n (n = 1..depth): its dims as kernel constexpr names and its offset in a state."""

    n: int
    din: str
    dout: str
    off: str


@dataclass(frozen=True)
class LqPlan:
    """Moneta's lq map n(Z) = max(||Z||_q^(q-2), eps) as the kernels' constexprs (_lq_* helpers)."""

    q: float
    qi: int  # q when it is an integer from 2 to 8 (|z|^q as products), else 0
    pw: float  # (q - 2) / q
    eps: float
    at0: float  # n at ||Z|| = 0 before the clamp: 0 for q > 2, 1 for q = 2
    chunk: bool  # norm=chunk: a token reads through its chunk's base norm (its own at a chunk's end)


@dataclass(frozen=True)
class Launch:
    """One kernel's launch setting: BX columns per weight tile (BXF for fp32 / tf32 operands, 0: BX),
    XS hidden columns per program (0: one program per head), warps, pipelining stages, a cap on
    registers per thread (0: none). Rendered as the generated module's _MLP_*_CONFIG dicts, which the
    benchmarks patch."""

    bx: int
    xs: int
    num_warps: int
    num_stages: int
    bxf: int = 0
    maxnreg: int = 0

    def source(self) -> str:
        keys = {"BX": self.bx, **({"BXF": self.bxf} if self.bxf else {}), "XS": self.xs,
                "num_warps": self.num_warps, "num_stages": self.num_stages, "maxnreg": self.maxnreg}
        return "{" + ", ".join(f'"{k}": {v}' for k, v in keys.items()) + "}"


@dataclass(frozen=True)
class MlpPlan:
    depth: int
    act: str
    norm: bool
    residual: bool
    layers: tuple[Layer, ...]
    momentum: bool
    retained: bool  # at=retained with a decay: the gradient point is E_i W_b
    lq: LqPlan | None
    eta_channel: bool
    bias_params: tuple[BiasParam, ...]
    bias_src: str  # the derived bias's @triton.jit _bias_grad / _bias_vjp
    activation_src: str  # @triton.jit _tl_act / _tl_dact / _tl_d2act
    library_src: str  # the helpers the kernels call, from mirasc/codegen/triton_lib (mlp.py, common.py)
    # depth 2 without an lq map: a head's programs may split the hidden columns (see _head_sum)
    sliceable: bool
    # gd on a sliceable memory: the forward is the writes and the read-out (two kernels)
    split_forward: bool
    fwd_slots: tuple[str, ...]  # the fused forward's [BT, DM] scratch slots
    bwd_slots: tuple[str, ...]  # the backward's
    hidden_slots: tuple[str, ...]  # slots of hidden columns (sliced with the program)
    fwd_launch: Launch
    read_launch: Launch | None  # the split forward's read-out
    bwd_launch: Launch
    min_chunk: int = MIN_CHUNK
    max_chunk: int = MAX_CHUNK

    def slot_lines(self, slots: tuple[str, ...]) -> list[str]:
        """The kernels' slot pointers as assignment lines: slot i is scr + i sz (sz = BT DM), a slot of
        hidden columns shifted by - x0 (see docs/kernels-mlp.md)."""
        offsets = ["", " + sz"] + [f" + {i} * sz" for i in range(2, len(slots))]
        return self.assignments([(s, "scr" + off + (" - x0" if s in self.hidden_slots else ""))
                                 for s, off in zip(slots, offsets)])

    @staticmethod
    def assignments(items: list[tuple[str, str]], width: int = 98) -> list[str]:
        """(name, expression) pairs as tuple assignments of at most `width` columns each (the kernels'
        pointer lines, indented 12 in the module)."""
        lines: list[list[tuple[str, str]]] = []
        for item in items:
            grown = (lines[-1] if lines else []) + [item]
            if lines and len(", ".join(n for n, _ in grown) + " = " + ", ".join(e for _, e in grown)) <= width:
                lines[-1] = grown
            else:
                lines.append([item])
        return [", ".join(n for n, _ in g) + " = " + ", ".join(e for _, e in g) for g in lines]

    @property
    def flags(self) -> dict[str, bool]:
        """The kernels' behaviour flags (tl.constexpr, passed by keyword): the LayerNorm, the residual, the
        retained point and the lq map (its rule: LQ_CHUNK, with the map's constants)."""
        return {"NORM": self.norm, "RESIDUAL": self.residual, "RETAINED": self.retained,
                "LQ": self.lq is not None}

    @property
    def kernels(self) -> tuple[str, ...]:
        fwd = ("_mlp_write_kernel", "_mlp_read_kernel") if self.split_forward else ("_mlp_fwd_kernel",)
        return (*fwd, "_mlp_bwd_kernel")


def lq_map(ir: LayerIR) -> bool:
    """True when the retention map is a true Lq normalisation (lq with q = 2 is the identity)."""
    return ir.retention.effective_map == "lq"


def _is_one(op) -> bool:
    return isinstance(op, (int, float)) and float(op) == 1.0


def _refusal(ir: LayerIR) -> str | None:
    mem, ret, alg = ir.memory, ir.retention, ir.algorithm
    if mem.kind != "mlp":
        return "not an MLP memory"
    if ir.bias.vjp is None:
        return "the bias carries no derived VJP for the backward kernel"
    if not 1 <= mem.depth <= MAX_DEPTH:
        return f"the MLP kernels cover depth 1 to {MAX_DEPTH}, got depth {mem.depth}; use backend='torch'"
    if mem.act not in ACTIVATIONS:
        return f"the activation '{mem.act}' has no triton kernel"
    if ret.map not in ("id", "lq"):
        return f"the retention map '{ret.map}' has no triton kernel for MLP memories"
    if lq_map(ir) and ret.q < 2.0:
        return "lq retention with q < 2 has no triton kernel for MLP memories"
    if alg.at == "retained" and not _is_one(ret.alpha) and lq_map(ir):
        # the gradient point map(a_i Z_b) is then a per-token matrix, not a scaling of the base pass
        return "at=retained with a non-identity retention map has no triton kernel for MLP memories"
    return None


def _layers(depth: int) -> tuple[Layer, ...]:
    dims = ["K"] + ["X"] * (depth - 1) + ["V"]
    offsets = ["0", "K * X"] + [f"K * X + {'' if n == 1 else f'{n} * '}X * X" for n in range(1, depth - 1)]
    return tuple(Layer(n, dims[n - 1], dims[n], offsets[n - 1]) for n in range(1, depth + 1))


def _slots(depth: int, split_forward: bool) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The [BT, DM] scratch slots of the fused forward and of the backward (see docs/kernels-mlp.md), and
    those of hidden columns (X wide: a program sliced by hidden columns keeps only its slice of them)."""
    fwd = [f"za{n}" for n in range(1, depth + 1)] + [f"dt{n}" for n in range(1, depth)] + ["dl"] \
        + [f"p{n}" for n in range(1, depth + 1)]
    bwd = fwd + [f"dp{n}" for n in range(1, depth + 1)] + [f"da{n}" for n in range(depth)] \
        + [f"dd{n}" for n in range(1, depth + 1)] + [f"dz{n}" for n in range(1, depth + 1)] + ["dq"]
    hidden = [s for s in bwd if s[-1].isdigit() and 1 <= int(s[-1]) < depth]
    if split_forward:  # p_1, p_2 and z_2 come from the forward's stored rows instead
        bwd = [s for s in bwd if s not in ("p1", "p2", f"za{depth}")]
    return tuple(fwd), tuple(bwd), tuple(hidden)


def _launches(sliceable: bool, split_forward: bool) -> tuple[Launch, Launch | None, Launch]:
    """The launch table (measurements behind it: docs/kernels-mlp.md)."""
    if split_forward:
        return (Launch(bx=64, xs=64, num_warps=4, num_stages=1), Launch(bx=32, xs=0, num_warps=4, num_stages=2),
                Launch(bx=64, bxf=64, xs=0, num_warps=8, num_stages=1))
    fwd = Launch(bx=64, xs=0, num_warps=8, num_stages=2)
    if sliceable:  # momentum
        return fwd, None, Launch(bx=64, bxf=32, xs=128, num_warps=4, num_stages=1)
    return fwd, None, Launch(bx=64, bxf=32, xs=0, num_warps=8, num_stages=1)


def _lq_plan(q: float, eps: float, norm: str) -> LqPlan:
    qi = int(q) if q == int(q) and 2 <= q <= 8 else 0
    return LqPlan(q=float(q), qi=qi, pw=(q - 2.0) / q, eps=float(eps), at0=0.0 if q > 2.0 else 1.0,
                  chunk=norm == "chunk")


# The activation and its first two derivatives as Triton function bodies (a docstring, then the code).
def _library(norm: bool, lq: LqPlan | None, momentum: bool, sliceable: bool) -> str:
    """The source of the library functions the kernels of this variant call (and their callees)."""
    names = ["_mm", "_ld", "_st", "_ldk", "_ldw", "_stw", "_ld_rows", "_st_rows", "_mlp_program", "_chunk_rows",
             "_decay_coefs", "_at_last", "_row_at_last", "_dlog_gate", "_layer_product", "_delta_product",
             "_readout_layer", "_readout_layer_vjp", "_weight_grad_layer", "_delta_vjp_layer", "_layer_vjp",
             "_retained", "_mlp_output", "_output_vjp", "_gates_vjp", "_st_dqk", "_pre_slots",
             "_ln_vjp_vjp"]  # the LayerNorm's helpers: the NORM flag picks them
    names += ["_momentum_coefs"] if momentum else []
    names += ["_head_sum"] if sliceable else []
    if lq is not None:  # norm=chunk: the chunk end's norm; norm=token: every token's
        names += ["_lq_base_norm", "_lq_kappa"] + (["_lq_chunk_end", "_lq_chunk_vjp"] if lq.chunk else
                                                   ["_lq_token_norms", "_lq_norms_vjp"])
    # the library marks its calls of the activation (pasted beside it here) for linters; not needed here
    return re.sub(r"  # noqa: F821[^\n]*", "", triton_lib.source(names))


def plan_mlp(ir: LayerIR) -> MlpPlan | Refusal:
    """The MLP kernels' plan for this layer, or the one reason it has none."""
    reason = _refusal(ir)
    if reason is not None:
        return Refusal(reason)
    mem, ret, alg = ir.memory, ir.retention, ir.algorithm
    momentum = alg.kind == "momentum"
    lq = lq_map(ir)
    sliceable = mem.depth == 2 and not lq  # an lq map needs the norm of whole weight matrices
    split_forward = sliceable and not momentum
    fwd_slots, bwd_slots, hidden_slots = _slots(mem.depth, split_forward)
    fwd_launch, read_launch, bwd_launch = _launches(sliceable, split_forward)
    bias_params = bias_params_of(ir)
    lq_plan = _lq_plan(ret.q, ret.eps, ret.norm) if lq else None
    return MlpPlan(
        depth=mem.depth, act=mem.act, norm=bool(mem.norm), residual=bool(mem.residual),
        layers=_layers(mem.depth), momentum=momentum,
        retained=alg.at == "retained" and not _is_one(ret.alpha),
        lq=lq_plan,
        eta_channel=eta_is_channel(ir),
        bias_params=bias_params,
        bias_src=bias_functions(ir, bias_params),
        activation_src=triton_activation_source(mem.act),
        library_src=_library(bool(mem.norm), lq_plan, momentum, sliceable),
        sliceable=sliceable, split_forward=split_forward,
        fwd_slots=fwd_slots, bwd_slots=bwd_slots, hidden_slots=hidden_slots,
        fwd_launch=fwd_launch, read_launch=read_launch, bwd_launch=bwd_launch,
    )


__all__ = [
    "ACTIVATIONS",
    "MAX_CHUNK",
    "MAX_DEPTH",
    "MIN_CHUNK",
    "BiasParam",
    "Launch",
    "Layer",
    "LqPlan",
    "MlpPlan",
    "lq_map",
    "plan_mlp",
]
