"""LayerIR: the resolved layer, everything code generation needs and nothing it must re-derive.

Produced by mirasc.symbolic.derive.derive(spec) and consumed by mirasc.codegen.  The bias is kept as
sympy expressions (codegen's printers turn them into torch / triton source); everything else is plain
numbers and strings.  An `Operand` is a literal number or the name of a runtime Param of the spec (a
learnable scalar per head, a gate, or a per-head constant).  Constants are inlined by the symbolic
stage: a `const` Param referenced by name (in the bias, the retention or the algorithm) arrives here as its float value, never
as a name, so codegen needs no table of constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .spec import BlockSpec, LayerSpec, MemorySpec, Param

Operand = Union[float, str]


@dataclass(frozen=True)
class BiasIR:
    """The attentional bias L(y, v) of one token, in the structured form of docs/semantics.md ("The attentional bias").

    L = F(S_1, ..., S_m; params) with S_r = sum_j f_r(y_j, v_j; params_j): every dependence on the
    memory output y goes through the reductions (an elementwise sum is itself one).  Symbols: `y`, `v`
    stand for one coordinate y_j, v_j; `S` are the reduction symbols; parameter symbols are named like
    their Params.  Scalar parameters are per token (broadcast over j); channel parameters are per j.

    grad:  dL/dy_j = sum_r dF/dS_r * df_r/dy_j, an expression in y, v, S and params.
    klass: "independent" (grad does not depend on y), "affine" (grad = y - c(v) with a constant unit
           Hessian, the delta-rule class) or "nonlinear".
    vjp:   the second-order pieces (see mirasc.symbolic.derive for their exact layout).
    """
    name: str  # library name, or "custom"
    klass: Literal["independent", "affine", "nonlinear"]
    params: tuple[str, ...]  # names of the non-constant Params the bias reads, in a fixed order
    y: Any
    v: Any
    reductions: tuple[tuple[Any, Any], ...]  # (S_r symbol, f_r expression)
    loss: Any  # F(S; params)
    grad: Any  # dL/dy_j
    vjp: Any = None
    text: str = ""  # the bias in readable math
    V: Any = None  # the value-dimension symbol (mean(x) = sum(x)/V); at run time y.shape[-1]
    param_symbols: tuple[tuple[str, Any], ...] = ()  # (name, sympy symbol) for each entry of params
    channel_params: tuple[str, ...] = ()  # the entries of params that are per value channel


@dataclass(frozen=True)
class RetentionIR:
    """How the state is carried and read.  See docs/semantics.md, "Retention".

    The carried state is Z (per weight matrix).  Per token: Z_t = alpha_t * Z_{t-1} - u_t, and the
    memory's weights are W_t = map(Z_t):
      map "id":             W = Z                                (none, decay)
      map "lq":             W = Z / max(||Z||_q^(q-2), eps)      (lq; norm over each weight matrix)
      map "softmax":        W = scale * softmax(Z, axis)          (kl)
      map "sigmoid":        W = sigmoid(Z)                        (bregman)
      map "soft_threshold": W = sign(Z) max(|Z| - gamma, 0)      (elastic_net)
    form "accumulate": Z is carried as is (FTRL / mirror-descent accumulator).
    form "prox": after each chunk the carried state is replaced by W (elastic_net form=retain, Eq. 22),
                 so the threshold acts once per chunk and, at chunk size 1, once per token.
    norm (lq only) "chunk": token i reads Z_i / n(Z_e), Z_e the state at the last chunk end at or before i
                 (the chunk's base, or Z_i itself for the token that ends a chunk); "token": Z_i / n(Z_i).
    """
    alpha: Operand  # 1.0 when there is no decay term
    map: Literal["id", "lq", "softmax", "sigmoid", "soft_threshold"] = "id"
    form: Literal["accumulate", "prox"] = "accumulate"
    q: float = 2.0
    eps: float = 1e-6
    axis: Literal["key", "value", "all"] = "key"
    scale: float = 1.0
    gamma: Operand = 0.0
    norm: Literal["chunk", "token"] = "chunk"  # lq: whose norm a token's read-out divides by (see above)

    @property
    def effective_map(self) -> str:
        """The map the backends apply: lq with q = 2 and eps <= 1 is the identity (||Z||_2^0 = 1, so
        W = Z / max(1, eps) = Z)."""
        return "id" if self.map == "lq" and self.q == 2.0 and self.eps <= 1.0 else self.map


@dataclass(frozen=True)
class AlgorithmIR:
    kind: Literal["gd", "momentum"]
    lr: Operand
    beta: Operand | None
    chunk: int
    at: Literal["previous", "retained"] = "previous"  # gradient at W_{t-1} or at alpha_t W_{t-1}


@dataclass(frozen=True)
class LayerIR:
    name: str
    block: BlockSpec
    memory: MemorySpec
    params: tuple[Param, ...]  # every declared Param (constants included)
    bias: BiasIR
    retention: RetentionIR
    algorithm: AlgorithmIR
    rule: str  # the derived update rule in plain math (docstrings, `mirasc explain`)
    source_hash: str  # sha256 of the spec text
    source_file: str = "<spec>"
    spec: LayerSpec | None = field(default=None, compare=False)

    def inputs(self) -> tuple[Param, ...]:
        """The keyword arguments of memory() and step(): the learnable scalars and gates, in keyword order."""
        return tuple(p for p in self.params if p.kind not in ("const", "per_head"))

    def backend_inputs(self) -> tuple[Param, ...]:
        """Every runtime tensor the backends read, in declaration order: inputs() and the per-head
        constants, which the module computes itself (they are no arguments of memory() or step())."""
        return tuple(p for p in self.params if p.kind != "const")

    def per_head(self) -> tuple[Param, ...]:
        """The per-head constants (mirasc.per_head), computed for the actual head count at run time."""
        return tuple(p for p in self.params if p.kind == "per_head")
