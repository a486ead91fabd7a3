"""The plan of the Triton read-out kernels for MLP memories with a non-linear retention map
(templates/triton_mlp_map.py.j2): Memora's `kl`, `bregman` and `elastic_net`.

A map is not linear in Z, so a token's read-out p_i = h_i map(Z_i) of a weight matrix has no
chunk-parallel (dual) form: every token needs its own Z_i. The torch backend materialises them
([B, H, C, d_in, d_out] per chunk and weight matrix, kept by autograd for the backward); these kernels
walk the chunk's tokens instead, each program over a tile of one weight matrix (all its input rows, a
slice of its output columns), updating Z_i in registers and reading every token out through map(Z_i);
the backward walks the tokens in reverse through the map's VJP. The rest of a chunk (the base pass, the
gates' products, the momentum buffers, the hidden layers' activations) stays the torch backend's, whose
autograd differentiates it: this family is the torch backend with its per-token read-out fused.
docs/kernels-mlp.md ("Retention maps") has the math and the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...ir import LayerIR
from .. import triton_lib
from . import Refusal
from .linear import AXIS_CODES, MAP_CODES

TILE = 4096  # elements of a program's [d_in, columns] tile of Z (with W, the gradient and the momentum)


@dataclass(frozen=True)
class MlpMapPlan:
    """The map as the matrix map kernels' _map_fwd / _map_vjp read it (plan.linear's MAP_CODES: kl's
    softmax, over the key axis, times scale; bregman's sigmoid; elastic net's soft threshold, gamma per
    token). The walk's gates (decay, momentum) are the rule's (ModulePlan.rule)."""

    map: str
    map_code: int
    axis_code: int
    scale: float
    library_src: str  # the Triton library functions the kernels call (mirasc.codegen.triton_lib)
    tile: int = TILE


def plan_mlp_map(ir: LayerIR) -> MlpMapPlan | Refusal | None:
    """The read-out kernels' plan for an MLP memory with a non-linear map, a Refusal naming why not, or
    None where the layer has no such map (the MLP chunk kernels' case, mirasc.codegen.plan.mlp)."""
    ret = ir.retention
    if ir.memory.kind != "mlp" or ret.effective_map not in MAP_CODES:
        return None
    if ret.map == "softmax" and ret.axis != "key":
        # a row or the whole matrix would have to sit in one program; the torch backend runs these
        return Refusal(f"kl over the {ret.axis!r} axis has no triton kernel for MLP memories (axis=key has)")
    return MlpMapPlan(map=ret.map, map_code=MAP_CODES[ret.map], axis_code=AXIS_CODES["key"],
                      scale=float(ret.scale),
                      library_src=triton_lib.source(["_map_walk", "_map_gamma", "_map_fwd", "_map_vjp"]))


__all__ = ["MlpMapPlan", "plan_mlp_map"]
