"""What the Triton kernels for MLP memories (templates/triton_mlp.py.j2) need from a LayerIR.

The kernels cover an MLP memory M(x) = [x +] [LN](z_L) of depth 1 to 4 (any expansion, activation gelu,
silu, relu, tanh or identity), any derived bias, retention `none`, `decay` (a per-head gate, a learnable
or a constant) and Moneta's `lq` map (with or without decay), gd and momentum, at=previous and (without
a non-identity map) at=retained, chunk sizes 1 to 64. `mlp_unsupported_reason` names what they do not
cover (the generated module then runs those layers on the torch backend, and backend="auto" picks it by
itself). The bias code is the same pair of @triton.jit functions (`_bias_grad`, `_bias_vjp`) that the
matrix memory's kernels call, printed here with the helpers of mirasc.codegen.triton.
"""
from __future__ import annotations

from ..ir import LayerIR
from .triton import bias_functions, bias_params_of, eta_is_channel, operand_source

MIN_CHUNK = 1  # chunks under 16 tokens run in tiles of 16 rows, `chunk` of them valid per pass
MAX_CHUNK = 64  # [BT, BT] and [BT, tile] register tiles beyond this spill registers
MAX_DEPTH = 4
ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")


def _lq_map(ir: LayerIR) -> bool:
    """True when the retention map is a true Lq normalisation (lq with q = 2 is the identity)."""
    ret = ir.retention
    return ret.map == "lq" and not (ret.q == 2.0 and ret.eps <= 1.0)


def _is_one(op) -> bool:
    return isinstance(op, (int, float)) and float(op) == 1.0


def mlp_unsupported_reason(ir: LayerIR) -> str | None:
    """Why this MLP-memory layer has no Triton kernels (None: it has them)."""
    mem, ret, alg = ir.memory, ir.retention, ir.algorithm
    params = {p.name: p for p in ir.params}

    def per_channel(op) -> bool:
        p = params.get(op) if isinstance(op, str) else None
        return p is not None and p.kind == "gate" and p.shape == "channel"

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
    if _lq_map(ir) and ret.q < 2.0:
        return "lq retention with q < 2 has no triton kernel for MLP memories"
    if per_channel(ret.alpha) or per_channel(alg.beta):
        return "per-channel decay has no triton kernel for MLP memories"
    if alg.at == "retained" and not _is_one(ret.alpha) and _lq_map(ir):
        # the gradient point map(a_i Z_b) is then a per-token matrix, not a scaling of the base pass
        return "at=retained with a non-identity retention map has no triton kernel for MLP memories"
    if _lq_map(ir) and ret.norm == "chunk":
        return "lq(norm=chunk) has no triton kernel yet; it runs on the torch backend"
    return None


def _layers(depth: int) -> list[dict]:
    """Per weight matrix W_l (l = 1..depth): its dims as kernel constexpr names and its offset in a state."""
    dims = ["K"] + ["X"] * (depth - 1) + ["V"]
    layers, off = [], []
    for n in range(1, depth + 1):
        din, dout = dims[n - 1], dims[n]
        layers.append({"n": n, "din": din, "dout": dout, "off": " + ".join(off) or "0"})
        off.append(f"{din} * {dout}")
    return layers


def _slots(depth: int) -> tuple[list[str], list[str]]:
    """Names of the [BT, DM] scratch slots of the forward and the backward kernel (see the template)."""
    fwd = [f"za{n}" for n in range(1, depth + 1)] + [f"dt{n}" for n in range(1, depth)] + ["dl"] \
        + [f"p{n}" for n in range(1, depth + 1)]
    bwd = fwd + [f"dp{n}" for n in range(1, depth + 1)] + [f"da{n}" for n in range(depth)] \
        + [f"dd{n}" for n in range(1, depth + 1)] + [f"dz{n}" for n in range(1, depth + 1)] + ["dq"]
    return fwd, bwd


def _hidden_slots(depth: int) -> list[str]:
    """The slots whose columns are hidden units (X wide): a program sliced by hidden columns keeps only its
    slice of them. The others are K or V wide (the first layer's input, the last layer's output)."""
    _, bwd = _slots(depth)
    return [s for s in bwd if s[-1].isdigit() and 1 <= int(s[-1]) < depth]


def _num(x: float) -> str:
    return repr(float(x))


def _lq_sources(q: float) -> tuple[str, str]:
    """|z|^q and its derivative q sign(z) |z|^(q-1) as Triton expressions in z (products for integer q)."""
    if q == int(q) and 2 <= q <= 8:
        n = int(q)
        power = " * ".join(["z"] * n)
        grad = f"{n}.0 * " + " * ".join(["z"] * (n - 1)) if n % 2 == 0 else \
            f"{n}.0 * " + " * ".join(["z"] * (n - 2) + ["tl.abs(z)"])
        if n % 2 == 1:
            power = " * ".join(["z"] * (n - 1) + ["tl.abs(z)"])
        return power, grad
    lg = "tl.log(tl.maximum(tl.abs(z), 1e-30))"
    return (f"tl.where(z == 0.0, 0.0, tl.exp({_num(q)} * {lg}))",
            f"tl.where(z == 0.0, 0.0, {_num(q)} * tl.where(z > 0.0, 1.0, -1.0) * tl.exp({_num(q - 1)} * {lg}))")


def triton_mlp_context(ir: LayerIR) -> dict | None:
    """Template variables for templates/triton_mlp.py.j2, or None when the layer is not covered."""
    if mlp_unsupported_reason(ir) is not None:
        return None
    bias_params = bias_params_of(ir)
    lr = ir.algorithm.lr
    ret, alg = ir.retention, ir.algorithm
    momentum = alg.kind == "momentum"
    lq = _lq_map(ir)
    fwd_slots, bwd_slots = _slots(ir.memory.depth)
    ctx = {
        "bias_params": bias_params,
        "triton_eta": operand_source(ir, lr, "eta"),
        "triton_alpha": operand_source(ir, ret.alpha, "alpha"),
        "triton_beta": operand_source(ir, alg.beta, "beta") if momentum else None,
        "triton_bias_args": [f"gates[{p['public']!r}].float().contiguous()" for p in bias_params],
        "triton_bias_src": bias_functions(ir, bias_params),
        "eta_channel": eta_is_channel(ir),
        "min_chunk": MIN_CHUNK,
        "max_chunk": MAX_CHUNK,
        "mlp_layers": _layers(ir.memory.depth),
        "mlp_momentum": momentum,
        "mlp_retained": alg.at == "retained" and not _is_one(ret.alpha),
        "mlp_lq": lq,
        "fwd_slots": fwd_slots,
        "bwd_slots": bwd_slots,
        "hidden_slots": _hidden_slots(ir.memory.depth),
        # a head's programs split the hidden columns (see _head_sum): one hidden layer, whose units only
        # meet in the last layer's sums; an lq map needs the norm of whole weight matrices
        "mlp_sliceable": ir.memory.depth == 2 and not lq,
    }
    if lq:
        power, grad = _lq_sources(ret.q)
        ctx.update({
            "lq_q": _num(ret.q),
            "lq_pw": _num((ret.q - 2.0) / ret.q),
            "lq_eps_lit": _num(ret.eps),
            "lq_at0": "0.0" if ret.q > 2.0 else "1.0",
            "lq_pow_src": power,
            "lq_grad_src": grad,
        })
    return ctx


__all__ = ["MAX_CHUNK", "MAX_DEPTH", "MIN_CHUNK", "mlp_unsupported_reason", "triton_mlp_context"]
