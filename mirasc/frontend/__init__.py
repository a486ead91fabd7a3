"""The frontend: `.miras` text -> checked mirasc.spec.LayerSpec.

    from mirasc.frontend import load_spec, load_spec_file
    spec = load_spec_file("examples/moneta.miras")

Two steps, each its own module: parse.py (lark grammar -> frozen AST with a Loc on every node) and
check.py (names, arities, numbers and the rules of docs/language.md -> LayerSpec).  Any problem in the
text is a mirasc.frontend.errors.SpecError with file:line:col and a caret.
"""
from __future__ import annotations

from os import PathLike
from pathlib import Path

from mirasc.spec import LayerSpec

from . import check, parse
from .errors import SpecError, source_line

# The submodules stay reachable as mirasc.frontend.parse / .check (their functions have the same names).
__all__ = ["SpecError", "check", "load_spec", "load_spec_file", "parse", "read_spec_text"]


def load_spec(text: str, file: str = "<spec>") -> LayerSpec:
    """Parse and check spec text; raises SpecError (and nothing else) for any bad text."""
    if not isinstance(text, str):
        raise TypeError(f"load_spec expects the spec text as str, not {type(text).__name__}")
    return check.check(parse.parse(text, file), text, file)


def read_spec_text(path: str | PathLike[str]) -> str:
    """The text of a .miras file; bytes that are not UTF-8 are a SpecError at their line and column.

    OSError (a missing or unreadable file) passes through: it is not a problem in the text.
    """
    name = str(path)
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        shown = source_line(data.decode("utf-8", errors="replace"), line)
        raise SpecError(f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})", name, line, col,
                        shown) from None


def load_spec_file(path: str | PathLike[str]) -> LayerSpec:
    """Read a .miras file (UTF-8) and load it; errors name the file as it was given."""
    return load_spec(read_spec_text(path), str(path))
