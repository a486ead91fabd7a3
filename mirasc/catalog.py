"""The names a spec may use: library biases, retention terms, algorithms, activations, functions.

This table is shared by the checker (arity and argument errors) and the symbolic stage (meaning); it
holds no sympy, so the frontend can import it.  Each entry lists its arguments in positional order with
their defaults (None: required).  An argument is a number or the name of a declared parameter unless
the entry says it must be a compile-time number.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arg:
    name: str
    default: float | str | bool | None = None  # None: required
    number_only: bool = False  # must be a literal number (it changes the shape of the derivation)
    choices: tuple[str, ...] = ()  # for word-valued arguments (e.g. kl axis)


@dataclass(frozen=True)
class Entry:
    name: str
    args: tuple[Arg, ...]
    doc: str


def _t(*entries: Entry) -> dict[str, Entry]:
    return {e.name: e for e in entries}


# Attentional biases (docs/semantics.md, "The attentional bias").  e = y - v, with y = M(W, k) and v the target.
BIASES = _t(
    Entry("dot", (), "dot product: L = -<y, v>  (Eq. 8, scaled so that lr 1 gives S += k^T v)"),
    Entry("l2", (), "squared error: L = 1/2 ||y - v||^2  (Eq. 9; lr beta gives the delta rule)"),
    Entry("l1", (Arg("eps", 1e-6, number_only=True),), "L = sum_j smooth_abs(e_j)  (Eq. 12, Remark 5)"),
    Entry("lp", (Arg("p", None, number_only=True), Arg("eps", 1e-6, number_only=True)),
          "L = sum_j smooth_abs(e_j)^p  (Eq. 10, Remark 5 surrogate)"),
    Entry("huber", (Arg("delta"),), "coordinate-wise Huber, sum_j H_delta(e_j)  (Eq. 14)"),
    Entry("huber_norm", (Arg("delta"), Arg("eps", 1e-6, number_only=True)),
          "norm-based Huber, H_delta(||e||_2)  (Eq. 15)"),
    Entry("huber_mix", (Arg("delta"), Arg("eps", 1e-6, number_only=True)),
          "Yaad's mixture: 1/2||e||^2 if ||e||_2 <= delta else delta * ||e||_1 (smooth)  (Eq. 16)"),
    Entry("robust", (Arg("Delta"), Arg("eps", 1e-6, number_only=True)),
          "worst case over value shifts: 1/2||e||^2 + Delta ||e||_2 + Delta^2/2  (Eq. 17)"),
)

# Retention terms (docs/semantics.md, "Retention maps").  A retention is a sum: at most one `decay` plus at most one map.
RETENTIONS = _t(
    Entry("none", (), "no retention: W_t = W_{t-1} - u_t"),
    Entry("decay", (Arg("alpha"),), "l2 retention as multiplicative decay alpha (Eqs. 8-9, Titans)"),
    Entry("l2", (Arg("alpha"),), "alias of decay"),
    Entry("lq", (Arg("q", None, number_only=True), Arg("eps", 1e-6, number_only=True),
                 Arg("norm", "chunk", choices=("chunk", "token"))),
          "Lq memory stability: W = A / ||A||_q^(q-2)  (Variant 4, Moneta Eq. 24); norm=chunk divides by "
          "the norm of the last chunk end's state (paper §5.4), norm=token by every token's own"),
    Entry("kl", (Arg("axis", "key", choices=("key", "value", "all")), Arg("scale", 1.0, number_only=True)),
          "KL / entropy retention: W = scale * softmax(Z)  (Eqs. 19-21, Memora Eq. 27)"),
    Entry("elastic_net", (Arg("gamma"), Arg("form", "retain", choices=("retain", "ftrl"))),
          "soft-thresholding: retain: W = S_g(alpha W - u)  (Eq. 22); ftrl: W = S_g(A)  (Eq. 23)"),
    Entry("bregman", (Arg("map", "sigmoid", choices=("sigmoid",)),),
          "Bregman (mirror) step with the logit mirror map: W = sigmoid(Z)  (Variant 5)"),
)

# Where the gradient is taken: at the previous state W_{t-1} (Eq. 5, Titans) or at the retained state
# alpha_t W_{t-1} (Gated DeltaNet: S_t = alpha_t (I - beta_t k^T k) S_{t-1} + beta_t k^T v).
_AT = Arg("at", "previous", choices=("previous", "retained"))

ALGORITHMS = _t(
    Entry("gd", (Arg("lr"), Arg("chunk", 1, number_only=True), _AT), "W_t = ret(W_{t-1}) - lr * grad"),
    Entry("momentum", (Arg("beta"), Arg("lr"), Arg("chunk", 1, number_only=True), _AT),
          "m_t = beta m_{t-1} + lr grad; W_t = ret(W_{t-1}) - m_t  (Titans)"),
)

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
GATE_ACTIVATIONS = ("sigmoid", "softplus", "exp", "tanh", "identity", "relu")
NORMS = ("rms", "layer", "none")

# Functions allowed in a bias expression: name -> number of arguments (None: reductions take one).
FUNCTIONS = {
    "abs": 1, "sign": 1, "sqrt": 1, "exp": 1, "log": 1, "tanh": 1, "sigmoid": 1, "softplus": 1,
    "log1p": 1, "cosh": 1, "sin": 1, "cos": 1,
    "min": 2, "max": 2,
    "smooth_abs": 1,   # sqrt(x^2 + 1e-6), the surrogate of Remark 5
    "smooth_sign": 1,  # x / sqrt(x^2 + 1e-6), the exact derivative of smooth_abs
}
REDUCTIONS = ("sum", "mean", "norm")  # over the value dimension; norm(x) = sqrt(sum(x^2) + 1e-6)

RESERVED = frozenset({"y", "v"}) | frozenset(FUNCTIONS) | frozenset(REDUCTIONS) | {"if", "then", "else"}
