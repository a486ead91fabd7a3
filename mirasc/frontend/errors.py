"""SpecError: the one exception the frontend raises for bad spec text.

Errors are part of the language (docs/language.md): every problem in a spec is reported as one line
`file:line:col: error: message`, followed by the offending source line and a caret under the column, the
way compilers do.  A user should never see a Python traceback for a spec they wrote, so the parser turns
lark's exceptions into SpecError and the checker raises nothing else.
"""
from __future__ import annotations

from mirasc.spec import Loc


class SpecError(Exception):
    """A syntax or semantic error at a place in a spec.

    Attributes: `file`, `line` and `col` (1-based; 0 when the error has no place in the text),
    `message` (one line, without the location), `source_line` (the text of that line, "" if unknown).
    """

    def __init__(self, message: str, file: str = "<spec>", line: int = 0, col: int = 0,
                 source_line: str = "") -> None:
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        self.source_line = source_line
        super().__init__(self.format())

    @classmethod
    def at(cls, loc: Loc, message: str, source: str) -> SpecError:
        """An error at `loc`, quoting its line from the full spec text `source`."""
        return cls(message, loc.file, loc.line, loc.col, source_line(source, loc.line))

    @property
    def loc(self) -> Loc:
        return Loc(self.file, self.line, self.col)

    def format(self) -> str:
        """`file:line:col: error: message`, then the source line and a caret under the column.

        The shown line is clipped to a window around the caret (a minified or garbage line can be
        thousands of characters) and control characters show as '?', so the report stays three lines.
        """
        message = _clip_middle(" ".join(self.message.split()), MAX_MESSAGE)
        head = f"{_printable(self.file)}:{self.line}:{self.col}: error: {message}"
        if self.line <= 0 or not self.source_line.strip():
            return head
        text = _printable(self.source_line.rstrip("\r\n"), keep_tabs=True)
        col = max(1, self.col)
        if len(text) > MAX_SHOWN:
            start = max(0, min(col - 1 - MAX_SHOWN // 2, len(text) - MAX_SHOWN))
            end = start + MAX_SHOWN
            prefix, suffix = ("..." if start else ""), ("..." if end < len(text) else "")
            text = prefix + text[start:end] + suffix
            col = col - start + len(prefix)
        stripped = text.lstrip()
        indent = len(text) - len(stripped)
        # Keep tabs in the padding so the caret lines up in a terminal however wide a tab is.
        before = stripped[: max(0, col - 1 - indent)]
        pad = "".join("\t" if ch == "\t" else " " for ch in before)
        return f"{head}\n    {stripped}\n    {pad}^"

    def __str__(self) -> str:
        return self.format()


MAX_SHOWN = 120  # characters of the source line shown around the caret
MAX_MESSAGE = 400  # a message quoting a huge name is cut in the middle


def _printable(text: str, keep_tabs: bool = False) -> str:
    """Control and other unprintable characters as '?', one for one (the caret column stays right)."""
    return "".join(ch if ch.isprintable() or (keep_tabs and ch == "\t") else "?" for ch in text)


def _clip_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def source_line(source: str, line: int) -> str:
    """Line `line` (1-based) of `source`, counted on "\\n" as lark counts lines; "" if out of range."""
    lines = source.split("\n")
    if 1 <= line <= len(lines):
        return lines[line - 1].rstrip("\r")
    return ""
