"""The plan of the matrix-memory chunk kernels (templates/triton_linear_*.py.j2).

`plan_linear(ir)` decides, once, everything those templates read: which kernel pair the layer gets (its
structural variant), the tl.constexpr behaviour flags the launches pass, the bias code, the Python sources
of the gate tensors, and the launch table (warps, stages, tiling rule, the shared-memory bounds of
`_fits`). docs/kernels-matrix.md describes the kernels and their decomposition.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ...ir import LayerIR
from .. import triton_lib
from ..triton import BiasParam, bias_functions, bias_params_of, eta_is_channel, shape_of
from . import Refusal


@dataclass(frozen=True)
class LinearLaunch:
    """Launch settings of the chunk kernels. The runtime part (tile size for a chunk size, head dims and
    dtype) is the generated `_config`, which reads these constants:

    tiling: how chunks map to tiles: "fixed" (64-token tiles whatever the chunk: the bias gradient ignores
    y), "wy" (chunks under 16 tokens share a 64-token tile for half-precision inputs with K <= 128, else a
    16-token one, solved as one triangular system), "substitute" (chunks under 16 tokens share a 16-token
    tile, solved by forward substitution), "segment" (the map kernels: the state is stored every
    max(16, chunk) tokens).
    fp32_sub16_area: the largest BK * BV an fp32 program holds when several chunks share a 16-token tile.
    min_bv: the narrowest value tile the kernels run on a GPU (the interpreter runs any): the momentum
    kernels fault (an illegal memory access) on an H100 with 32-column tiles, which a head of 32 value
    columns or a forced slicing would give (benchmarks/results/momentum_slices_*.md); such layers run on
    the torch backend until that is found.
    """

    num_warps: int
    num_stages: int | None  # None: Triton's default software pipelining
    tiling: str
    fp32_sub16_area: int
    min_bv: int = 16


@dataclass(frozen=True)
class LinearPlan:
    """Every decision the matrix-memory kernel templates read."""

    kernels: str  # the kernel pair: "scalar" (per-head decay), "momentum", "channel" (per-channel decay),
    # "map" (a retention map: token by token, any of the gates per head or per channel)
    bias_params: tuple[BiasParam, ...]
    bias_src: str  # the @triton.jit _bias_grad / _bias_vjp pair printed from the derived bias
    library_src: str  # the Triton library functions the kernels call (mirasc.codegen.triton_lib)
    needs_y: bool  # the bias gradient reads the prediction y = k S
    eta_channel: bool  # the lr is a gate per value channel (ETA_CHANNEL)
    alpha_channel: bool  # the decay is a gate per value channel (the "channel" kernels)
    momentum: bool
    wy: bool  # an affine bias with per-head gates: chunks sharing a tile form one triangular system (WY)
    at_retained: bool  # gradients at the retained point (AT_RETAINED)
    column_separable: bool  # wide heads may run as column slices
    launch: LinearLaunch
    map_flags: MapFlags | None = None  # the "map" kernels' retention map (None for the others)


# The map kernels' MAP constexpr for each retention map (mirasc/codegen/triton_lib/linear.py, _map_fwd).
MAP_CODES = {"softmax": 1, "sigmoid": 2, "soft_threshold": 3}
AXIS_CODES = {"key": 0, "value": 1, "all": 2}


@dataclass(frozen=True)
class MapFlags:
    """The tl.constexpr flags of the "map" kernels: the map (MAP_CODES), the softmax's axis (AXIS_CODES)
    and scale, whether the chunk carries S_gamma(Z) (PROX, elastic_net(form=retain)), and which gates
    are per value channel."""

    map: int
    axis: int
    scale: float
    prox: bool
    alpha_channel: bool
    beta_channel: bool
    gamma_channel: bool


def refusal_reason(ir: LayerIR) -> str | None:
    """Why this layer has no matrix-memory Triton kernels (None: it has them)."""
    if ir.bias.vjp is None:
        return "the bias carries no derived VJP for the backward kernel"
    if ir.memory.kind != "linear":
        return "the triton backend covers matrix memories; MLP memories run on the torch backend"
    ret = ir.retention
    if ret.effective_map in MAP_CODES:  # the "map" kernels take every gate, per head or per channel
        return None
    if ret.effective_map != "id":
        return f"the retention map '{ret.map}' has no triton kernel yet"
    gates = (shape_of(ir, ir.retention.alpha), shape_of(ir, ir.algorithm.beta))
    if ir.algorithm.kind == "momentum" and "channel" in gates:
        return "momentum with a per-channel decay or momentum gate has no triton kernel yet"
    return None


def column_separable(bias) -> bool:
    """Whether dL/dy_j and its VJPs read value column j only (no reduction over the value dimension, no
    V): then the columns of a matrix memory evolve independently, and the kernels may run a head's
    state as several column slices (the generated `_value_slices`)."""
    banned = {s for s, _ in bias.reductions} | {r for r, _ in bias.vjp.sums}
    if bias.V is not None:
        banned.add(bias.V)
    pieces = [bias.grad, bias.vjp.dy, bias.vjp.dv]
    pieces += [x for p in bias.vjp.dparams for x in (p.elem, p.token)]
    return not any(sp.sympify(e).free_symbols & banned for e in pieces)


# The library functions each kernel pair calls (triton_lib.source adds their callees).
_SHARED = ("_mm", "_program", "_tile_offsets", "_load_gate", "_suffix_sum", "_unit_tril_inverse",
           "_row_at_last", "_at_last")
LIBRARY = {
    "scalar": (*_SHARED, "_log_decays"),
    "momentum": (*_SHARED, "_log_decays", "_momentum_weights"),
    "channel": (*_SHARED, "_log_decays_channel", "_seg", "_decay_mm", "_decay_mm_bwd"),
    "map": ("_program", "_token_gate", "_retention_gates", "_load_state", "_map_fwd", "_map_vjp", "_base_point",
            "_state_before", "_readout_bwd", "_point_bwd", "_base_bwd", "_store_gate_grad"),
}


def _launch(kernels: str, needs_y: bool, wy: bool) -> LinearLaunch:
    """The launch table. The momentum and per-channel kernels run 8 warps (fewer spills) and turn off
    software pipelining of the tile loads (its buffers would exceed a Hopper SM's shared memory in some
    configurations). The WY backward holds a [BT, BT] inverse more, and the momentum backward a state
    and its gradient more, so their fp32 16-token tiles stop at 128 x 64 (docs/kernels-matrix.md has the
    measurements). The map kernels run 8 warps without pipelining
    (benchmarks/results/check_sm90_maps_2026-12-05.md)."""
    if kernels == "map":  # 8 warps for the backward's ten-odd [BK, BV] fp32 tensors held in registers
        return LinearLaunch(num_warps=8, num_stages=1, tiling="segment", fp32_sub16_area=0)
    tiling = "fixed" if not needs_y else ("wy" if wy else "substitute")
    return LinearLaunch(
        num_warps=4 if kernels == "scalar" else 8,
        num_stages=None if kernels == "scalar" else 1,
        tiling=tiling,
        fp32_sub16_area=128 * (64 if wy or kernels == "momentum" else 128),
        min_bv=64 if kernels == "momentum" else 16,
    )


def plan_linear(ir: LayerIR) -> LinearPlan | Refusal:
    """The matrix-memory kernels' plan for a layer, or the Refusal saying why it has none."""
    reason = refusal_reason(ir)
    if reason is not None:
        return Refusal(reason)
    params = bias_params_of(ir)
    momentum = ir.algorithm.kind == "momentum"
    eta_channel = eta_is_channel(ir)
    alpha_channel = shape_of(ir, ir.retention.alpha) == "channel"
    ret = ir.retention
    map_flags = None
    if ret.effective_map in MAP_CODES:
        kernels = "map"
        map_flags = MapFlags(
            map=MAP_CODES[ret.effective_map], axis=AXIS_CODES[ret.axis], scale=float(ret.scale),
            prox=ret.form == "prox", alpha_channel=alpha_channel,
            beta_channel=momentum and shape_of(ir, ir.algorithm.beta) == "channel",
            gamma_channel=ret.effective_map == "soft_threshold" and shape_of(ir, ret.gamma) == "channel")
    else:
        kernels = "channel" if alpha_channel else ("momentum" if momentum else "scalar")
    needs_y = ir.bias.klass != "independent"
    # chunks under 16 tokens of an affine bias (the delta rule) solve one triangular system per tile (the
    # WY form); a per-channel lr or decay gives every value column its own system
    wy = ir.bias.klass == "affine" and not eta_channel and not alpha_channel
    return LinearPlan(
        kernels=kernels,
        bias_params=params,
        bias_src=bias_functions(ir, params),
        library_src=triton_lib.source(LIBRARY[kernels]),
        needs_y=needs_y,
        eta_channel=eta_channel,
        alpha_channel=alpha_channel,
        momentum=momentum,
        wy=wy,
        at_retained=ir.algorithm.at == "retained",
        # a softmax over the values or the whole matrix couples a head's value columns
        column_separable=column_separable(ir.bias) and not (map_flags is not None and map_flags.map == 1
                                                             and map_flags.axis != 0),
        launch=_launch(kernels, needs_y, wy),
        map_flags=map_flags,
    )


__all__ = ["AXIS_CODES", "LIBRARY", "MAP_CODES", "BiasParam", "LinearLaunch", "LinearPlan", "MapFlags",
           "column_separable", "plan_linear", "refusal_reason"]
