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




def format_plan(obj, indent: int = 0, name: str = "") -> str:
    """A plan as indented text, one field per line (for `mirasc explain --plan`). Long text fields
    (printed code) show their first line and their length; nested plans and tuples are expanded."""
    import dataclasses

    pad = "  " * indent
    label = f"{name}: " if name else ""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        lines = [f"{pad}{label}{type(obj).__name__}"]
        for f in dataclasses.fields(obj):
            lines.append(format_plan(getattr(obj, f.name), indent + 1, f.name))
        return "\n".join(lines)
    if isinstance(obj, (tuple, list)) and obj and any(dataclasses.is_dataclass(x) for x in obj):
        return "\n".join([f"{pad}{label}[{len(obj)}]"] + [format_plan(x, indent + 1, str(i)) for i, x in enumerate(obj)])
    if isinstance(obj, str) and ("\n" in obj or len(obj) > 100):
        first = obj.strip().splitlines()[0] if obj.strip() else ""
        return f"{pad}{label}<{len(obj.splitlines())} lines> {first[:80]}"
    return f"{pad}{label}{obj!r}"


__all__ = ["Refusal", "format_plan"]
