"""The symbolic middle: LayerSpec -> LayerIR (sympy derivation of the bias gradient, VJPs and class)."""
from __future__ import annotations

from .derive import BiasVJP, ParamVJP, derive, derive_bias
from .explain import explain
from .objectives import DeriveError

__all__ = ["BiasVJP", "DeriveError", "ParamVJP", "derive", "derive_bias", "explain"]
