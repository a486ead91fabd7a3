"""The frontend: every example loads, resolved fields are right, and bad specs fail at the right place.

Bad specs are small edits of BASE; each case names the exact line and column the error must point at
and a phrase its message must contain, so a regression in either the checker or the error positions
shows up here.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from mirasc.frontend import load_spec, load_spec_file
from mirasc.frontend.errors import SpecError
from mirasc.frontend.parse import parse
from mirasc.spec import Binary, Call, IfElse, Num, Ref, Unary, Var

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.miras"))

BASE = """\
layer Test {
    heads 4
    key_dim 16
    value_dim 16
    memory linear
    gate eta : head = softplus(rank=8, init=0.5)
    gate alpha : head = sigmoid(rank=8, init=0.9)
    bias l2
    retention decay(alpha)
    algorithm gd(lr=eta, chunk=16)
}
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def fails(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(text, "t.miras")
    return info.value


def assert_caret(err: SpecError) -> None:
    """str(err) is the header, the source line (indented by 4) and a caret under the column."""
    lines = str(err).split("\n")
    assert lines[0] == f"{err.file}:{err.line}:{err.col}: error: {err.message}"
    assert len(lines) == 3, str(err)
    source = err.source_line
    stripped = source.lstrip()
    assert lines[1] == "    " + stripped
    assert lines[2].strip() == "^"
    assert lines[2].index("^") - 4 == err.col - 1 - (len(source) - len(stripped))


# ---- the examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_load(path: Path) -> None:
    spec = load_spec_file(path)
    assert spec.file == str(path)
    assert spec.source == path.read_text()
    assert spec.name.isidentifier()
    assert spec.memory is not None and spec.bias is not None and spec.algorithm is not None
    assert spec.loc.line >= 1


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 13


def test_moneta_fields() -> None:
    spec = load_spec_file(ROOT / "examples" / "moneta.miras")
    assert spec.name == "Moneta"
    assert (spec.block.heads, spec.block.key_dim, spec.block.value_dim, spec.block.conv) == (16, 64, 64, 4)
    assert spec.block.qk_norm is True and spec.block.out_norm == "rms" and spec.block.out_gate is True
    mem = spec.memory
    assert (mem.kind, mem.depth, mem.expansion, mem.act, mem.residual, mem.norm, mem.init) == \
        ("mlp", 2, 4, "gelu", True, True, "learned")
    assert spec.bias.name == "lp" and spec.bias.expr is None
    assert dict(spec.bias.args) == {"p": Ref(value=3.0), "eps": Ref(value=1e-6)}
    kinds = [t.kind for t in spec.retention.terms]
    assert kinds == ["decay", "lq"]
    assert dict(spec.retention.terms[0].args) == {"alpha": Ref(name="alpha")}
    assert dict(spec.retention.terms[1].args) == {"q": Ref(value=4.0), "eps": Ref(value=1e-6), "norm": "chunk"}
    alg = spec.algorithm
    assert (alg.kind, alg.lr, alg.beta, alg.chunk) == ("gd", Ref(name="eta"), None, 64)
    eta = spec.param("eta")
    assert (eta.kind, eta.shape, eta.activation, eta.rank, eta.init) == ("gate", "head", "softplus", 32, 0.1)
    assert (eta.loc.line, eta.loc.col) == (14, 10)
    assert (spec.bias.loc.line, spec.bias.loc.col) == (17, 10)


def test_cauchy_user_expression() -> None:
    spec = load_spec_file(ROOT / "examples" / "cauchy.miras")
    assert spec.bias.name is None
    c = spec.param("c")
    assert (c.kind, c.init, c.activation, c.shape) == ("learnable", 1.0, "softplus", "head")
    # sum(log(1 + ((y - v) / c)^2)); equality of spec nodes ignores locations.
    y, v = Var("y"), Var("v")
    expected = Call("sum", (Call("log", (Binary("+", Num(1.0), Binary("^", Binary("/", Binary("-", y, v),
                                                                              Var("c")), Num(2.0))),)),))
    assert spec.bias.expr == expected
    assert (spec.bias.expr.loc.line, spec.bias.expr.loc.col) == (10, 10)


def test_quantile_if_else_and_const() -> None:
    spec = load_spec_file(ROOT / "examples" / "quantile.miras")
    tau = spec.param("tau")
    assert (tau.kind, tau.value) == ("const", 0.8)
    body = spec.bias.expr.args[0]
    assert isinstance(body, IfElse) and body.cond.op == ">="
    assert (body.loc.line, body.loc.col) == (10, 14)
    alg = spec.algorithm
    assert (alg.kind, alg.beta, alg.lr, alg.chunk) == ("momentum", Ref(value=0.9), Ref(name="eta"), 16)


def test_defaults_filled() -> None:
    spec = load_spec(BASE)
    assert (spec.block.conv, spec.block.qk_norm, spec.block.out_norm, spec.block.out_gate) == (4, True, "rms", True)
    assert (spec.memory.kind, spec.memory.init) == ("linear", "zero")
    assert spec.algorithm.chunk == 16 and spec.algorithm.at == "previous"
    mlp = load_spec(edit("memory linear", "memory mlp"))
    assert (mlp.memory.depth, mlp.memory.expansion, mlp.memory.act, mlp.memory.residual, mlp.memory.norm) == \
        (2, 4, "gelu", True, True)
    kl = load_spec(edit("decay(alpha)", "decay(alpha) + kl"))
    assert dict(kl.retention.terms[1].args) == {"axis": "key", "scale": Ref(value=1.0)}
    gd = load_spec(edit("gd(lr=eta, chunk=16)", "gd(eta)"))
    assert gd.algorithm.chunk == 1


def test_block_options_and_keywords_as_words() -> None:
    text = edit("    memory linear\n", "    conv 0\n    qk_norm none\n    out_norm layer\n    out_gate false\n"
                                      "    memory linear init learned\n")
    spec = load_spec(text)
    assert (spec.block.conv, spec.block.qk_norm, spec.block.out_norm, spec.block.out_gate) == \
        (0, False, "layer", False)
    assert spec.memory.init == "learned"


def test_positional_and_keyword_arguments_agree() -> None:
    a = load_spec(edit("bias l2", "bias lp(3, 1e-5)"))
    b = load_spec(edit("bias l2", "bias lp(p=3, eps=1e-5)"))
    c = load_spec(edit("bias l2", "bias lp(eps=0.00001, p=3.0)"))
    assert a.bias == b.bias == c.bias
    assert dict(a.bias.args) == {"p": Ref(value=3.0), "eps": Ref(value=1e-5)}
    m1 = load_spec(edit("gd(lr=eta, chunk=16)", "momentum(0.9, eta, 16)"))
    m2 = load_spec(edit("gd(lr=eta, chunk=16)", "momentum(chunk=16, lr=eta, beta=0.9)"))
    assert m1.algorithm == m2.algorithm
    g1 = load_spec(edit("softplus(rank=8, init=0.5)", "softplus(8, 0.5)"))
    assert g1.params == load_spec(BASE).params
    p1 = load_spec(edit("bias l2", "param c = learnable(2.0, softplus)\n    bias sum(c * (y - v)^2)"))
    p2 = load_spec(edit("bias l2", "param c = learnable(act=softplus, init=2)\n    bias sum(c * (y - v)^2)"))
    assert p1.param("c") == p2.param("c")


def test_comments_and_blank_lines_are_ignored() -> None:
    noisy = ("# a header comment\n\n"
             "layer Test {   # trailing\n"
             "\n"
             "    heads 4  # four heads\n"
             "    # a full-line comment\n"
             "    key_dim 16\n    value_dim 16\n\n\n"
             "    memory linear\n"
             "    gate eta : head = softplus(rank=8, init=0.5)  # lr\n"
             "    gate alpha : head = sigmoid(rank=8, init=0.9)\n"
             "    bias sum((y - v)^2) # comment after an expression\n"
             "    retention decay(alpha)\n"
             "    algorithm gd(lr=eta, chunk=16)\n"
             "}\n# trailing comment")
    spec = load_spec(noisy)
    assert spec.name == "Test"
    assert (spec.loc.line, spec.loc.col) == (3, 7)
    assert (spec.param("eta").loc.line, spec.param("eta").loc.col) == (12, 10)
    assert (spec.bias.expr.loc.line, spec.bias.expr.loc.col) == (14, 10)
    err = fails(noisy.replace("chunk=16", "chunk=24"))
    assert (err.line, err.col) == (16, 32)
    # A comment between a statement and its continuation does not shift locations.
    err = fails(noisy.replace("bias sum((y - v)^2)", "bias sum((y - v)^2 # open\n  + q)"))
    assert (err.line, err.col, err.message.startswith("unknown name 'q'")) == (15, 5, True)


def test_expression_precedence() -> None:
    def bias(expr: str):
        return load_spec(edit("bias l2", f"bias {expr}")).bias.expr

    y, v = Var("y"), Var("v")
    # -x^2 is -(x^2); ^ is right-associative; * binds tighter than +; 2^-1 is allowed.
    assert bias("sum(-y^2)") == Call("sum", (Unary("-", Binary("^", y, Num(2.0))),))
    assert bias("sum(y^2^3)") == Call("sum", (Binary("^", y, Binary("^", Num(2.0), Num(3.0))),))
    assert bias("sum(y + v * 2)") == Call("sum", (Binary("+", y, Binary("*", v, Num(2.0))),))
    assert bias("sum(y - v - 1)") == Call("sum", (Binary("-", Binary("-", y, v), Num(1.0)),))
    assert bias("sum(y^-1)") == Call("sum", (Binary("^", y, Unary("-", Num(1.0))),))
    assert bias("mean(y * 1e-6)").args[0].rhs == Num(1e-6)
    combined = bias("sum(y) / norm(v) + mean(y * v)")  # reductions combine outside (they do not nest)
    assert isinstance(combined, Binary)
    cond = bias("if sum(y) <= 1 then sum(y^2) else norm(y - v)")  # a top-level if on reductions
    assert isinstance(cond, IfElse) and cond.cond.op == "<="
    ok = bias("sum(if sign(y - v) > 0 then y else 2 * y)")  # sign inside a condition is fine
    assert isinstance(ok.args[0], IfElse)


def test_every_node_has_a_location() -> None:
    spec = load_spec_file(ROOT / "examples" / "quantile.miras")

    def walk(node):
        assert node.loc.line > 0 and node.loc.col > 0, node
        for child in ("arg", "lhs", "rhs", "cond", "then", "other"):
            if hasattr(node, child):
                walk(getattr(node, child))
        for child in getattr(node, "args", ()):
            walk(child)

    walk(spec.bias.expr)
    for p in spec.params:
        assert p.loc.line > 0
    for t in spec.retention.terms:
        assert t.loc.line > 0
    layer = parse(BASE, "b.miras")
    assert all(s.loc.line > 0 and s.loc.file == "b.miras" for s in layer.stmts)


def test_statements_in_any_order() -> None:
    lines = BASE.splitlines()
    shuffled = "\n".join([lines[0], *reversed(lines[1:-1]), lines[-1]])
    a, b = load_spec(shuffled), load_spec(BASE)
    assert sorted(a.params, key=lambda p: p.name) == sorted(b.params, key=lambda p: p.name)
    assert (a.bias, a.retention, a.algorithm, a.memory, a.block) == (b.bias, b.retention, b.algorithm, b.memory,
                                                                      b.block)


def test_identifiers_and_numbers_are_plain() -> None:
    """What reaches codegen from the text: identifiers of the safe shape and real numbers."""
    for path in EXAMPLES:
        spec = load_spec_file(path)
        assert spec.name.isidentifier() and spec.name.isascii()
        for p in spec.params:
            assert p.name.isidentifier() and not p.name.startswith("_")
            for value in (p.value, p.init):
                assert value is None or type(value) is float
            assert type(p.rank) is int
        assert type(spec.algorithm.chunk) is int


# ---- bad specs ------------------------------------------------------------------------------------

BAD = [
    # syntax
    ("missing_close_brace", edit("}\n", ""), 10, 35, "unexpected end of input; expected a statement or '}'"),
    ("missing_open_brace", edit("layer Test {", "layer Test"), 1, 11, "expected '{'"),
    ("bad_character", edit("heads 4", "heads 4;"), 2, 12, "unexpected character ';'"),
    ("unterminated_call", edit("decay(alpha)", "decay(alpha"), 9, 26,
     "unexpected end of line; expected an operator, '(', ')', ','"),
    ("unterminated_expression", edit("bias l2", "bias sum(y - v) *"), 8, 22,
     "unexpected end of line; expected an expression"),
    ("missing_operand", edit("bias l2", "bias sum(y - )"), 8, 18, "unexpected ')'; expected an expression"),
    ("number_for_name", edit("gate eta :", "gate 3 :"), 6, 10, "unexpected number 3; expected a name"),
    ("chained_compare", edit("bias l2", "bias sum(if y < v < 1 then y else v)"), 8, 23, "unexpected '<'"),
    ("empty_text", "", 1, 1, "unexpected end of input; expected 'layer'"),
    ("two_layers", BASE + "layer B {}\n", 12, 1, "unexpected 'layer'; expected end of input"),
    # unknown names
    ("unknown_statement", edit("heads 4", "head 4"), 2, 5, "unknown statement 'head'; expected one of: heads,"),
    ("unknown_bias", edit("bias l2", "bias lpp(p=3)"), 8, 10, "unknown bias 'lpp'; expected one of: dot, l2"),
    ("unknown_retention", edit("decay(alpha)", "decay(alpha) + lqq(q=4)"), 9, 30, "unknown retention 'lqq'"),
    ("unknown_algorithm", edit("gd(lr=eta, chunk=16)", "sgd(lr=eta)"), 10, 15,
     "unknown algorithm 'sgd'; expected one of: gd, momentum"),
    ("unknown_gate_activation", edit("sigmoid(rank", "sigmoidd(rank"), 7, 25, "unknown gate activation 'sigmoidd'"),
    ("unknown_learnable_activation",
     edit("bias l2", "param c = learnable(1.0, swish)\n    bias sum(c * (y - v)^2)"), 8, 30,
     "argument 'act' of learnable must be one of: sigmoid, softplus"),
    ("unknown_mlp_act", edit("memory linear", "memory mlp(act=swish)"), 5, 20,
     "argument 'act' of mlp must be one of: gelu, silu"),
    ("unknown_memory", edit("memory linear", "memory conv1d"), 5, 12, "unknown memory 'conv1d'"),
    ("unknown_word", edit("memory linear", "out_norm batch\n    memory linear"), 5, 14,
     "unknown out_norm 'batch'; expected one of: rms, layer, none"),
    ("unknown_function", edit("bias l2", "bias sum(logg(y - v))"), 8, 14, "unknown function 'logg'"),
    ("unknown_variable", edit("bias l2", "bias sum((y - z)^2)"), 8, 19, "unknown name 'z' in the bias"),
    ("unknown_parameter_argument", edit("lr=eta", "lr=etaa"), 10, 21,
     "unknown parameter 'etaa' (declared: eta, alpha)"),
    ("library_bias_in_expression", edit("bias l2", "bias l2 + sum(y)"), 8, 10, "'l2' is a library bias"),
    ("function_without_call", edit("bias l2", "bias sum(exp)"), 8, 14, "'exp' is a function"),
    # arities and arguments
    ("too_many_positional", edit("bias l2", "bias lp(3, 1e-6, 2)"), 8, 22, "too many arguments: lp takes at most 2"),
    ("unknown_keyword", edit("bias l2", "bias lp(pp=3)"), 8, 13, "unknown argument 'pp' for lp; expected one of: p, eps"),
    ("duplicate_keyword", edit("bias l2", "bias lp(3, p=3)"), 8, 16, "argument 'p' of lp is given twice"),
    ("missing_required", edit("bias l2", "bias lp"), 8, 10, "lp needs the argument 'p'"),
    ("missing_gate_init", edit("sigmoid(rank=8, init=0.9)", "sigmoid(rank=8)"), 7, 25,
     "sigmoid needs the argument 'init'"),
    ("function_arity", edit("bias l2", "bias sum(min(y))"), 8, 14, "min takes 2 arguments, got 1"),
    ("reduction_arity", edit("bias l2", "bias sum(y, v)"), 8, 10, "sum takes 1 argument, got 2"),
    ("positional_after_keyword", edit("gd(lr=eta, chunk=16)", "gd(lr=eta, 16)"), 10, 26,
     "positional argument after a keyword argument"),
    ("keyword_in_function", edit("bias l2", "bias sum(x=y)"), 8, 14, "take positional arguments only"),
    ("linear_with_arguments", edit("memory linear", "memory linear(2)"), 5, 19, "memory linear takes no arguments"),
    ("expression_argument", edit("lr=eta", "lr=eta*2"), 10, 24, "must be a number or a parameter name"),
    ("choice_argument", edit("decay(alpha)", "decay(alpha) + kl(axis=row)"), 9, 38,
     "argument 'axis' of kl must be one of: key, value, all"),
    # numbers
    ("chunk_not_power_of_two", edit("chunk=16", "chunk=48"), 10, 32, "chunk size must be a power of two"),
    ("chunk_too_large", edit("chunk=16", "chunk=512"), 10, 32, "between 1 and 256"),
    ("heads_zero", edit("heads 4", "heads 0"), 2, 11, "heads must be between 1 and 65536"),
    ("heads_negative", edit("heads 4", "heads -2"), 2, 11, "heads must be between 1 and 65536"),
    ("heads_fraction", edit("heads 4", "heads 2.5"), 2, 11, "heads must be a whole number"),
    ("conv_too_large", edit("heads 4", "heads 4\n    conv 17"), 3, 10, "conv must be between 0 and 16"),
    ("lp_p_below_one", edit("bias l2", "bias lp(p=0.5)"), 8, 15, "lp p must be >= 1"),
    ("lq_q_one", edit("decay(alpha)", "decay(alpha) + lq(1)"), 9, 33, "lq q must be > 1"),
    ("eps_zero", edit("bias l2", "bias l1(eps=0)"), 8, 17, "l1 eps must be > 0"),
    ("rank_huge", edit("sigmoid(rank=8", "sigmoid(rank=1e300"), 7, 38, "gate rank must be between 1 and 65536"),
    ("rank_zero", edit("sigmoid(rank=8", "sigmoid(rank=0"), 7, 38, "gate rank must be between 1 and 65536"),
    ("depth_five", edit("memory linear", "memory mlp(depth=5)"), 5, 22, "mlp depth must be between 1 and 4"),
    ("expansion_nine", edit("memory linear", "memory mlp(expansion=9)"), 5, 26, "mlp expansion must be between 1 and 8"),
    ("number_too_large", edit("init=0.5", "init=1e999"), 6, 45, "number 1e999 is too large"),
    ("number_only_given_parameter", edit("bias l2", "bias lp(p=eta)"), 8, 15,
     "argument 'p' of lp must be a literal number"),
    ("number_only_given_const", edit("bias l2", "const p = 3\n    bias lp(p)"), 9, 13,
     "must be a literal number (it fixes the shape of the derivation), not the constant 'p'"),
    ("init_outside_sigmoid", edit("init=0.9", "init=1.5"), 7, 46, "init 1.5 is outside the range of sigmoid"),
    ("decay_above_one", edit("decay(alpha)", "decay(1.5) + kl(scale=2)"), 9, 21, "decay alpha must be in (0, 1]"),
    ("division_by_zero", edit("bias l2", "bias sum(y / 0)"), 8, 18, "division by zero"),
    # names: reserved, injection-looking, duplicates
    ("dunder_gate", edit("gate eta :", "gate __import__ :"), 6, 10, "names starting with '_' are reserved"),
    ("layer_dotted_name", edit("layer Test", "layer os.system"), 1, 9, "unexpected character '.'; expected '{'"),
    ("layer_keyword_name", edit("layer Test", "layer class"), 1, 7, "layer name 'class' is reserved (a Python keyword)"),
    ("layer_builtin_name", edit("layer Test", "layer object"), 1, 7, "reserved (a Python builtin)"),
    ("param_python_keyword", edit("gate eta :", "gate lambda :"), 6, 10, "'lambda' is reserved (a Python keyword)"),
    ("param_generated_name", edit("gate eta :", "gate self :"), 6, 10, "'self' is reserved (used by the generated code)"),
    ("param_torch", edit("gate eta :", "gate torch :"), 6, 10, "'torch' is reserved"),
    ("param_y", edit("gate eta :", "gate y :"), 6, 10, "'y' is reserved"),
    ("param_function_name", edit("gate eta :", "gate exp :"), 6, 10, "'exp' is reserved (a name of the bias language)"),
    ("param_underscore", edit("gate eta :", "gate _eta :"), 6, 10, "names starting with '_' are reserved"),
    ("unicode_name", edit("gate eta :", "gate ηta :"), 6, 10, "unexpected character 'η'"),
    ("duplicate_parameter", edit("gate alpha :", "gate eta :"), 7, 10, "'eta' is already declared (at line 6)"),
    ("duplicate_statement", edit("key_dim 16", "heads 8"), 3, 5, "duplicate 'heads' statement (first at line 2)"),
    ("missing_bias", edit("    bias l2\n", ""), 1, 7, "layer 'Test' has no 'bias' statement"),
    ("missing_memory", edit("    memory linear\n", ""), 1, 7, "has no 'memory' statement"),
    # the bias
    ("bias_without_y", edit("bias l2", "bias sum(v^2)"), 8, 10, "the bias does not depend on y"),
    ("bias_only_parameters", edit("bias l2", "bias eta * 2"), 8, 10, "the bias does not depend on y"),
    ("bare_y_top_level", edit("bias l2", "bias sum(y^2) + y"), 8, 21, "the bias must be a scalar: wrap elementwise"),
    ("bare_v_in_condition", edit("bias l2", "bias if v > 0 then sum(y) else sum(y^2)"), 8, 13,
     "the bias must be a scalar"),
    ("sign_of_y", edit("bias l2", "bias sum(sign(y - v) * (y - v))"), 8, 14,
     "sign has zero gradient almost everywhere; use smooth_sign"),
    ("sign_in_branch", edit("bias l2", "bias sum(if y > 0 then sign(y) else y)"), 8, 28, "use smooth_sign"),
    # retention
    ("two_decays", edit("decay(alpha)", "decay(alpha) + l2(alpha)"), 9, 30, "at most one decay term"),
    ("two_maps", edit("decay(alpha)", "lq(q=4) + kl"), 9, 25, "'kl' conflicts with 'lq'"),
    ("none_combined", edit("decay(alpha)", "none + decay(alpha)"), 9, 15, "'none' cannot be combined"),
    # gates and the memory
    ("channel_alpha_with_mlp", edit("memory linear", "memory mlp(residual=false)",
                                    edit("alpha : head", "alpha : channel")), 9, 21,
     "per-channel retention needs a linear memory"),
    ("channel_beta_with_mlp",
     edit("gd(lr=eta, chunk=16)", "momentum(beta=b, lr=eta, chunk=16)",
          edit("memory linear", "memory mlp\n    gate b : channel = sigmoid(rank=8, init=0.9)")), 11, 29,
     "per-channel retention needs a linear memory"),
    ("channel_threshold", edit("bias l2", "gate d : channel = softplus(rank=8, init=1)\n    bias huber_mix(d)"),
     9, 20, "huber_mix tests a norm, its threshold must be a scalar"),
    ("channel_gate_outside_reduction",
     edit("bias l2", "gate c : channel = softplus(rank=8, init=1)\n    bias sum((y - v)^2) * c"), 9, 27,
     "the bias must be a scalar"),
    ("mlp_residual_dims", edit("value_dim 16", "value_dim 32", edit("memory linear", "memory mlp")), 5, 12,
     "needs key_dim == value_dim (got 16 and 32)"),
    ("mlp_residual_explicit", edit("value_dim 16", "value_dim 32", edit("memory linear", "memory mlp(2, 4, gelu, true)")),
     5, 28, "residual=true"),
    ("unused_gate", edit("gd(lr=eta, chunk=16)", "gd(lr=1, chunk=16)"), 6, 10, "gate 'eta' is declared but not used"),
    ("unused_const", edit("bias l2", "const k2 = 3\n    bias l2"), 8, 11, "constant 'k2' is declared but not used"),
    ("bad_gate_shape", edit("eta : head", "eta : token"), 6, 16, "unknown gate shape 'token'; expected one of: head, channel"),
    ("param_not_learnable", edit("bias l2", "param c = trainable(1.0)\n    bias sum(c * y)"), 8, 15,
     "a param is learnable(INIT[, ACTIVATION])"),
    ("bad_bool", edit("memory linear", "out_gate yes\n    memory linear"), 5, 14, "unknown out_gate 'yes'"),
]


@pytest.mark.parametrize(("text", "line", "col", "phrase"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_spec(text: str, line: int, col: int, phrase: str) -> None:
    err = fails(text)
    assert (err.line, err.col) == (line, col), str(err)
    assert phrase in err.message, str(err)
    assert err.file == "t.miras"
    assert "\n" not in err.message
    if text.strip():
        assert_caret(err)


def test_bad_specs_are_distinct_and_many() -> None:
    assert len({c[0] for c in BAD}) == len(BAD) >= 30
    assert len({c[1] for c in BAD}) == len(BAD)


def test_error_format() -> None:
    err = fails(edit("bias l2", "bias lpp(p=3)"))
    assert str(err) == ("t.miras:8:10: error: unknown bias 'lpp'; expected one of: dot, l2, l1, lp, huber, "
                        "huber_norm, huber_mix, robust (or an expression in y and v)\n"
                        "    bias lpp(p=3)\n"
                        "         ^")
    assert isinstance(err, Exception) and err.loc.line == 8


def test_tab_indentation_keeps_the_caret_aligned() -> None:
    err = fails(edit("    bias l2", "\tbias\tlpp"))
    assert (err.line, err.col) == (8, 7)
    assert str(err).split("\n")[1:] == ["    bias\tlpp", "        \t^"]


def test_load_spec_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.miras"
    path.write_text(edit("chunk=16", "chunk=3"))
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    assert str(info.value).startswith(f"{path}:10:32: error: chunk size must be a power of two")
    path.write_bytes(b"layer A {\n  heads \xff\n}")
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    assert (info.value.line, info.value.col) == (2, 9) and "UTF-8" in info.value.message


def test_no_traceback_for_mangled_text() -> None:
    """Random edits of real specs raise SpecError or load; never any other exception."""
    rng = random.Random(1234)
    sources = [p.read_text() for p in EXAMPLES]
    alphabet = "(){}[]=:+-*/^<>,.#_ \n\tazxy0123456789e\"'@$\\"
    for _ in range(600):
        text = list(rng.choice(sources))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text))
            op = rng.random()
            if op < 0.4:
                del text[i]
            elif op < 0.8:
                text.insert(i, rng.choice(alphabet))
            else:
                j = min(len(text), i + rng.randint(1, 20))
                del text[i:j]
        try:
            load_spec("".join(text), "fuzz.miras")
        except SpecError as err:
            assert err.line >= 1 and err.col >= 1 and "\n" not in err.message


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    from mirasc.frontend.parse import MAX_DEPTH, MAX_PARENS

    assert load_spec(edit("bias l2", "bias sum(" + "(" * (MAX_PARENS - 1) + "y" + ")" * (MAX_PARENS - 1) + ")"))
    for deep in ("abs(" * 3000 + "y" + ")" * 3000, "-" * 3000 + "y", "y^" * 3000 + "2"):
        err = fails(edit("bias l2", f"bias sum({deep})"))
        assert ("nested too deeply" in err.message or "too long" in err.message) and err.line == 8
    depth = MAX_DEPTH - 1  # sum(...) is the first level
    assert load_spec(edit("bias l2", "bias sum(" + "abs(" * depth + "y" + ")" * depth + ")"))


def test_language_reference_names_every_library_entry() -> None:
    """docs/language.md lists every name a spec may use; a catalog addition must be documented."""
    from mirasc import catalog
    from mirasc.frontend.parse import STATEMENTS

    doc = (ROOT / "docs" / "language.md").read_text()
    names = [*catalog.BIASES, *catalog.RETENTIONS, *catalog.ALGORITHMS, *catalog.ACTIVATIONS,
             *catalog.GATE_ACTIVATIONS, *catalog.FUNCTIONS, *catalog.REDUCTIONS, *STATEMENTS]
    missing = [n for n in names if f"`{n}" not in doc]
    assert not missing, missing
    for entry in (*catalog.BIASES.values(), *catalog.RETENTIONS.values(), *catalog.ALGORITHMS.values()):
        for arg in entry.args:
            assert arg.name in doc, (entry.name, arg.name)


def test_mlp_memory_defaults_to_learned_init_and_refuses_zero():
    base = "layer X {\n    memory mlp%s\n    bias l2\n    retention none\n    algorithm gd(lr=0.1)\n}\n"
    assert load_spec(base % "", "x.miras").memory.init == "learned"
    with pytest.raises(SpecError) as err:
        load_spec(base % " init zero", "x.miras")
    assert (err.value.line, err.value.col) == (2, 21)
    assert "no useful zero state" in str(err.value)
