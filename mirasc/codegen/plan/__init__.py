"""The plan stage: everything the templates read, decided once, as frozen dataclasses.

Between the IR and the templates: one function per kernel family takes a LayerIR and returns the
family's plan, or a `Refusal` naming the one reason the layer cannot use that family. Templates only
read plans (jinja's StrictUndefined turns a missing field into an error); every variant and launch
decision lives in a plan function, where codegen tests assert on it without rendering.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a layer cannot use a kernel family (shown by `mirasc explain --plan` and by the generated
    module when the family's backend is asked for)."""

    reason: str


__all__ = ["Refusal"]
