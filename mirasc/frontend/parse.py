"""Spec text -> mirasc.frontend.ast.Layer, with lark (LALR, contextual lexer, positions kept).

Syntax errors come out of lark as UnexpectedToken / UnexpectedCharacters / UnexpectedEOF, which name
grammar terminals (`RPAR`, `$END`, ...).  `parse` turns them into a SpecError that reads like a
compiler's: the place, what was found, what could have come there in words ("unknown statement 'headz'",
"unexpected end of line; expected ')'"), the source line and a caret.
"""
from __future__ import annotations

import re
from functools import lru_cache

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from mirasc._resources import resource_dir
from mirasc.spec import Loc

from . import ast
from .errors import SpecError, source_line

# The statement keywords, in the order the language reference lists them.
STATEMENTS = ("heads", "key_dim", "value_dim", "conv", "qk_norm", "out_norm", "out_gate", "memory",
              "const", "param", "gate", "bias", "retention", "algorithm")
_STATEMENT_TERMINALS = frozenset(s.upper() for s in STATEMENTS)
# How deeply bias expressions may nest (docs/language.md, "Limits").  A level is a function call, a
# unary minus, either side of `^`, an if/else, or the right operand of + - * /; the left operand of
# + - * / stays on its parent's level, so a flat chain `a + b + c + ...` is one level however long.
# The derivation's time grows polynomially in this depth (a few seconds at the limit).
MAX_DEPTH = 32
# Parentheses may nest at most this deep, counted on the text before anything is parsed, and a spec has
# at most MAX_TOKENS tokens: together they bound the parser's time (lark takes ~50 us a token) so that
# absurd input is refused at once, with a place, instead of after seconds.
MAX_PARENS = 2 * MAX_DEPTH
MAX_TOKENS = 10_000
_ARITHMETIC = frozenset({"+", "-", "*", "/"})
_TOKEN = re.compile(r"#[^\n]*|[A-Za-z0-9_.]+|[^\sA-Za-z0-9_.#]")
_OPERATORS = frozenset({"PLUS", "MINUS", "STAR", "SLASH", "CARET"})
_EXPRESSION_START = frozenset({"NAME", "NUMBER", "LPAR"})

# Terminal names -> words for "expected ..." (keyword terminals are spelled out from their names).
_READABLE = {
    "NAME": "a name", "NUMBER": "a number", "COMPARE": "a comparison (<, <=, >, >=)",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "CARET": "'^'",
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "COMMA": "','", "EQUAL": "'='",
    "COLON": "':'", "$END": "end of input",
}
# The order in which expected things are listed (anything else goes last, alphabetically).
_ORDER = ("a statement", "an expression", "an operator", "a comparison (<, <=, >, >=)", "a name",
          "a number", "'('", "')'", "','", "'='", "':'", "'{'", "'}'", "'+'", "'-'", "'*'", "'/'",
          "'^'", "end of input")


@lru_cache(maxsize=1)
def parser() -> Lark:
    """The lark parser for grammar/miras.lark (built once per process)."""
    path = resource_dir("grammar") / "miras.lark"
    return Lark(path.read_text(encoding="utf-8"), parser="lalr", lexer="contextual",
                propagate_positions=True, maybe_placeholders=True)


def parse(text: str, file: str = "<spec>") -> ast.Layer:
    """Parse spec text into its AST; raises SpecError on a syntax error, never a lark exception."""
    _prescan(text, file)
    try:
        tree = parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, file) from None
    try:
        return _Builder(file, text).layer(tree.children[0])
    except RecursionError:  # _Builder limits nesting first; this is only a safety net
        raise SpecError("the spec is nested too deeply", file, 1, 1, source_line(text, 1)) from None


def _prescan(text: str, file: str) -> None:
    """Refuse too many tokens and too deep parentheses in one linear pass, before lark sees the text."""
    depth = 0
    for count, m in enumerate(_TOKEN.finditer(text), 1):
        token = m.group()
        if token.startswith("#"):
            continue
        if count > MAX_TOKENS:
            line, col = _line_col(text, m.start())
            raise _error(f"the spec is too long (more than {MAX_TOKENS} tokens)", text, file, line, col)
        if token == "(":
            depth += 1
            if depth > MAX_PARENS:
                line, col = _line_col(text, m.start())
                raise _error(f"expression nested too deeply (parentheses more than {MAX_PARENS} levels "
                             f"deep)", text, file, line, col)
        elif token == ")":
            depth = max(0, depth - 1)


# ---- parse tree -> AST ---------------------------------------------------------------------------


class _Builder:
    """Walks the lark tree of one spec and builds the frozen AST, giving every node its Loc."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text

    def loc(self, item: Token | Tree) -> Loc:
        if isinstance(item, Token):
            return Loc(self.file, item.line or 0, item.column or 0)
        return Loc(self.file, getattr(item.meta, "line", 0), getattr(item.meta, "column", 0))

    def name(self, token: Token) -> ast.Name:
        return ast.Name(str(token), self.loc(token))

    def layer(self, tree: Tree) -> ast.Layer:
        keyword, name, *stmts = tree.children
        return ast.Layer(self.name(name), tuple(self.stmt(s) for s in stmts), self.loc(keyword))

    def stmt(self, tree: Tree) -> ast.Stmt:
        kids = tree.children
        keyword: Token = kids[0]
        kw, loc = str(keyword), self.loc(keyword)
        kind = tree.data
        if kind == "int_stmt":
            return ast.IntStmt(kw, self.signed(kids[1]), loc)
        if kind == "word_stmt":
            return ast.WordStmt(kw, self.name(kids[1]), loc)
        if kind == "memory_stmt":
            init = self.name(kids[3]) if kids[3] is not None else None
            return ast.MemoryStmt(kw, self.named(kids[1]), init, loc)
        if kind == "const_stmt":
            return ast.ConstStmt(kw, self.name(kids[1]), self.signed(kids[2]), loc)
        if kind == "param_stmt":
            return ast.ParamStmt(kw, self.name(kids[1]), self.named(kids[2]), loc)
        if kind == "gate_stmt":
            return ast.GateStmt(kw, self.name(kids[1]), self.name(kids[2]), self.named(kids[3]), loc)
        if kind == "bias_stmt":
            return ast.BiasStmt(kw, self.expr(kids[1]), self.loc(kids[1]), loc)
        if kind == "retention_stmt":
            terms = tuple(self.named(k) for k in kids[1:] if isinstance(k, Tree))
            return ast.RetentionStmt(kw, terms, loc)
        if kind == "algorithm_stmt":
            return ast.AlgorithmStmt(kw, self.named(kids[1]), loc)
        raise AssertionError(f"unknown statement rule {kind}")  # the grammar has no other

    def signed(self, tree: Tree) -> ast.Expr:
        if len(tree.children) == 2:
            minus, number = tree.children
            return ast.Neg(ast.Number(str(number), self.loc(number)), self.loc(minus))
        (number,) = tree.children
        return ast.Number(str(number), self.loc(number))

    def named(self, tree: Tree) -> ast.Named:
        (child,) = tree.children
        return self.call(child) if isinstance(child, Tree) else self.name(child)

    def call(self, tree: Tree, depth: int = 0) -> ast.Call:
        fn, *args = tree.children
        built = []
        for arg in args:
            if arg is None:  # `f()`: the optional argument list is absent
                continue
            if arg.data == "kwarg":
                key, value = arg.children
                built.append(ast.Arg(self.name(key), self.expr(value, depth), self.loc(key)))
            else:
                (value,) = arg.children
                built.append(ast.Arg(None, self.expr(value, depth), self.loc(value)))
        return ast.Call(self.name(fn), tuple(built), self.loc(fn))

    def expr(self, tree: Tree, depth: int = 0) -> ast.Expr:
        if depth > MAX_DEPTH:
            # Later stages (the checker, sympy) walk expressions recursively and the derivation's time grows
            # with the depth; refuse deep nesting here, with a place, before anything else walks it.
            loc = self.loc(tree)
            raise SpecError(f"expression nested too deeply (more than {MAX_DEPTH} levels of function calls, "
                            f"operands and if/else)", self.file, loc.line, loc.col,
                            source_line(self.text, loc.line))
        kind, kids = tree.data, tree.children
        if kind == "binary" and str(kids[1]) in _ARITHMETIC:
            # A left-associated chain: walk down its left operands in a loop (same level), so a chain of
            # any length costs no recursion; every right operand is one level deeper.
            spine = []
            node = tree
            while isinstance(node, Tree) and node.data == "binary" and str(node.children[1]) in _ARITHMETIC:
                spine.append(node)
                node = node.children[0]
            built = self.expr(node, depth)
            for link in reversed(spine):
                _lhs, op, rhs = link.children
                built = ast.BinOp(str(op), built, self.expr(rhs, depth + 1), self.loc(op))
            return built
        depth += 1
        if kind == "number":
            return ast.Number(str(kids[0]), self.loc(kids[0]))
        if kind == "name":
            return self.name(kids[0])
        if kind == "neg":
            return ast.Neg(self.expr(kids[1], depth), self.loc(kids[0]))
        if kind == "binary":  # ^
            lhs, op, rhs = kids
            return ast.BinOp(str(op), self.expr(lhs, depth), self.expr(rhs, depth), self.loc(op))
        if kind == "call":
            return self.call(tree, depth)
        if kind == "ifexpr":
            _if, cond, _then, then, _else, other = kids
            lhs, op, rhs = cond.children
            compare = ast.Compare(str(op), self.expr(lhs, depth), self.expr(rhs, depth), self.loc(op))
            return ast.IfElse(compare, self.expr(then, depth), self.expr(other, depth), self.loc(_if))
        raise AssertionError(f"unknown expression rule {kind}")  # the grammar has no other


# ---- syntax errors -------------------------------------------------------------------------------


def _syntax_error(exc: UnexpectedInput, text: str, file: str) -> SpecError:
    """A readable SpecError for one of lark's syntax exceptions."""
    expected = _expected(exc)
    line, col = exc.line, exc.column
    if isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        token: Token = exc.token
        line, col = token.line, token.column
        starts_line = _first_on_line(text, line, col)
        if token.type == "NAME" and starts_line and expected & _STATEMENT_TERMINALS:
            return _error(f"unknown statement '{token}'; expected one of: {', '.join(STATEMENTS)}",
                          text, file, line, col)
        if starts_line and not expected & (_STATEMENT_TERMINALS | {"$END"}):
            # The statement on an earlier line stopped short (an unclosed parenthesis, a dangling
            # operator): point at its end rather than at the innocent next statement.
            end = _end_of_previous(text, line, col)
            if end is not None:
                return _error(f"unexpected end of line; expected {_words(expected)}", text, file, *end)
        keyword_start = _keyword_read_as_name(text, token)
        if keyword_start is not None:
            # `bias y *` then `retention ...` on the next line: where a name may stand, the contextual
            # lexer reads the keyword as a name and the error surfaces one token later.  Parse the text
            # up to the keyword to learn what the unfinished statement still needed.
            try:
                parser().parse(text[:keyword_start])
            except UnexpectedToken as early:
                needed = _expected(early)
                if early.token.type == "$END" and not needed & (_STATEMENT_TERMINALS | {"$END"}):
                    end = _end_of_previous(text, *_line_col(text, keyword_start))
                    if end is not None:
                        return _error(f"unexpected end of line; expected {_words(needed)}", text, file, *end)
            except UnexpectedInput:
                pass
        message = f"unexpected {_describe(token)}"
    elif isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if 0 <= exc.pos_in_stream < len(text) else ""
        message = f"unexpected character {char!r}"
    else:  # UnexpectedEOF, or UnexpectedToken at $END
        end = _end_of_previous(text, text.count("\n") + 2, 1)
        line, col = end if end is not None else (1, 1)
        message = "unexpected end of input"
    if expected:
        message += f"; expected {_words(expected)}"
    return _error(message, text, file, line, col)


def _error(message: str, text: str, file: str, line: int, col: int) -> SpecError:
    return SpecError(message, file, line, col, source_line(text, line))


def _expected(exc: UnexpectedInput) -> set[str]:
    """The terminals that could have come instead, exactly (LALR's own `expected` over-approximates)."""
    interactive = getattr(exc, "interactive_parser", None)
    if interactive is not None:
        try:
            return set(interactive.accepts())
        except Exception:  # noqa: BLE001 - lark's approximate set below is good enough
            return set(getattr(exc, "expected", None) or ())
    return set(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ())


def _words(terminals: set[str]) -> str:
    """Terminal names as a short English list: 'a statement', 'an operator', "')'", ..."""
    left = set(terminals)
    words: set[str] = set()
    if len(left & _STATEMENT_TERMINALS) >= 3:
        words.add("a statement")
        left -= _STATEMENT_TERMINALS
    if _EXPRESSION_START <= left:
        words.add("an expression")
        left -= _EXPRESSION_START | {"MINUS", "IF"}
    if len(left & _OPERATORS) >= 4:
        words.add("an operator")
        left -= _OPERATORS
    for name in left:
        words.add(_READABLE.get(name, f"'{name.lower()}'"))
    rank = {w: i for i, w in enumerate(_ORDER)}
    ordered = sorted(words, key=lambda w: (rank.get(w, len(rank)), w))
    if len(ordered) == 1:
        return ordered[0]
    return ", ".join(ordered[:-1]) + " or " + ordered[-1]


def _describe(token: Token) -> str:
    if token.type == "NAME":
        return f"name '{token}'"
    if token.type == "NUMBER":
        return f"number {token}"
    return f"'{token}'"


def _keyword_read_as_name(text: str, token: Token) -> int | None:
    """The offset of a statement keyword that starts the line just before `token`, if there is one."""
    start = token.start_pos
    if start is None:
        return None
    line_start = text.rfind("\n", 0, start) + 1
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*", text[line_start:start])
    if m and m.group(1) in STATEMENTS:
        return line_start + m.start(1)
    return None


def _line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, col) of a character offset."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _code(line: str) -> str:
    """A line without its comment (the language has no strings, so '#' always starts one)."""
    return line.split("#", 1)[0]


def _first_on_line(text: str, line: int, col: int) -> bool:
    """Whether only whitespace precedes column `col` of `line`."""
    return not source_line(text, line)[: col - 1].strip()


_LAST_CHAR = re.compile(r"\S\s*$")


def _end_of_previous(text: str, line: int, col: int) -> tuple[int, int] | None:
    """(line, col) just after the last code character before (line, col), skipping comments."""
    lines = text.split("\n")
    current = _code(source_line(text, line)[: col - 1]) if line <= len(lines) else ""
    if current.strip():
        m = _LAST_CHAR.search(current)
        return line, (m.start() + 2) if m else col
    for number in range(min(line - 1, len(lines)), 0, -1):
        code = _code(lines[number - 1].rstrip("\r"))
        m = _LAST_CHAR.search(code)
        if m:
            return number, m.start() + 2
    return None
