"""The Triton helper library: the @triton.jit functions that generated kernels share.

Every module of this package is ordinary Python: linted like the rest of mirasc and imported by its own
unit tests (tests/test_triton_lib*.py), which run each function under Triton's interpreter against a
torch oracle. Generated modules import only torch and triton, so the code generator pastes the source of
the functions a kernel family calls into each module: `source(names)` returns those functions and every
library function they call, callees first, each once. A function name is defined once in the whole
library; templates never redefine one.

mirasc itself never imports the modules of this package (they need triton): it reads their text.
"""
from __future__ import annotations

import ast
import textwrap
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent


class LibraryError(LookupError):
    pass


@lru_cache(maxsize=1)
def _library() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (source text with its decorators, names of the library functions it calls)."""
    texts: dict[str, tuple[str, set[str]]] = {}
    for path in sorted(_HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.parse(text, str(path)).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            if node.name in texts:
                raise LibraryError(f"{node.name} is defined twice in the Triton library ({path.name})")
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            called = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            texts[node.name] = ("\n".join(lines[start:node.end_lineno]), called)
    return {name: (src, frozenset(c for c in called if c in texts and c != name))
            for name, (src, called) in texts.items()}


def names() -> list[str]:
    """Every function the library defines."""
    return sorted(_library())


def closure(wanted) -> list[str]:
    """The named functions and every library function they call, callees before their callers."""
    lib = _library()
    unknown = [n for n in wanted if n not in lib]
    if unknown:
        raise LibraryError(f"not in the Triton library: {', '.join(unknown)}")
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for callee in sorted(lib[name][1]):
            visit(callee)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def source(wanted, indent: int = 0, exclude=()) -> str:
    """The source of `closure(wanted)`, two blank lines between functions, indented by `indent` spaces;
    `exclude`: names the module defines already (pasted by another kernel family), left out."""
    lib = _library()
    text = "\n\n\n".join(lib[name][0] for name in closure(wanted) if name not in exclude)
    return textwrap.indent(text, " " * indent) if indent else text


__all__ = ["LibraryError", "closure", "names", "source"]
