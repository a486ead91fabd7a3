"""The module plan and the one kernel decision (mirasc.codegen.plan.module), asserted without rendering,
and the templates' contract: they read only the plans."""
from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pytest
from jinja2 import meta

from mirasc import __version__
from mirasc.cli import main
from mirasc.codegen.emit import plans
from mirasc.codegen.plan import Refusal, format_plan
from mirasc.codegen.plan.module import KernelChoice, ModulePlan
from mirasc.compiler import compile_spec

ROOT = Path(__file__).resolve().parent.parent


def _plans(stem: str, replace: tuple[str, str] | None = None):
    text = (ROOT / "examples" / f"{stem}.miras").read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    return plans(compile_spec(text, f"{stem}.miras").ir, __version__)


def _no_step(axis: str) -> str:
    return f"the MLP step kernel covers kl over the key axis, not over {axis!r}"


@pytest.mark.parametrize(("stem", "replace", "family", "step", "reason", "step_reason"), [
    pytest.param("gated_deltanet", None, "linear", True, "", "", id="gated_deltanet-linear-and-step"),
    pytest.param("quantile", None, "linear", True, "", "", id="quantile-momentum-linear-and-step"),
    pytest.param("titans", None, "mlp", True, "", "", id="titans-mlp-and-step"),
    pytest.param("moneta", ("lq(q=4)", "lq(q=4, norm=token)"), "mlp", True, "", "", id="moneta-token-mlp-and-step"),
    pytest.param("moneta", None, "mlp", True, "", "", id="moneta-chunk-mlp-and-step"),
    pytest.param("memora", None, "mlp_map", True, "", "", id="memora-map-readout-and-step"),
    pytest.param("memora", ("kl(axis=key)", "kl(axis=value)"), None, False,
                 "kl over the 'value' axis has no triton kernel for MLP memories (axis=key has)",
                 _no_step("value"), id="memora-value-axis-refused"),
])
def test_one_kernel_decision(stem, replace, family, step, reason, step_reason):
    p = _plans(stem, replace)
    k = p.module.kernels
    assert isinstance(p.module, ModulePlan) and isinstance(k, KernelChoice)
    assert (k.family, k.step, k.reason, k.step_reason) == (family, step, reason, step_reason)
    # the choice agrees with the family plans it was made from
    family_plan = p.mlp_map if p.mlp_map is not None else p.mlp if p.module.memory.mlp else p.linear
    assert isinstance(family_plan, Refusal) == (family is None)
    assert isinstance(p.step, Refusal) == (not step)
    if family is not None:
        assert k.eta is not None and len(k.bias_args) == len(p.module.bias.params)


def test_module_plan_fields_follow_the_spec():
    m = _plans("gated_deltanet").module
    assert (m.block.heads, m.block.key_dim, m.block.conv_tail) == (16, 64, 3)
    assert m.rule.at_retained and m.rule.has_decay and m.torch.wy and not m.memory.mlp
    assert [p.name for p in m.public_inputs] == ["beta", "alpha"] and m.rule.lr.name == "beta"
    t = _plans("titans").module
    assert t.memory.mlp and t.rule.momentum and t.state.tuple_doc.startswith("4 tensors")
    assert "def _act_grad" in t.memory.act_src


# names a template may read besides the plans: values an including template sets with {% set %}
_SET_BY_INCLUDER = {"lr_rows", "wy_coefs", "R", "fwd_ptrs", "call_args", "call_head"}


def test_templates_read_only_the_plans():
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    folder = ROOT / "templates"
    for path in sorted(folder.glob("*.j2")):
        text = path.read_text()
        free = meta.find_undeclared_variables(env.parse(text))
        local_sets = set(re.findall(r"\{%-?\s*set\s+(\w+)", "".join(p.read_text() for p in folder.glob("*.j2"))))
        assert free <= {"m", "linear", "mlp_plan", "mlp_map", "step"} | (_SET_BY_INCLUDER & local_sets), \
            (path.name, free)


def test_explain_plan_prints_every_plan(capsys):
    assert main(["explain", "--plan", str(ROOT / "examples" / "quantile.miras")]) == 0
    out = capsys.readouterr().out
    for line in ("module (m): ModulePlan", "kernels: KernelChoice", "family: 'linear'",
                 "matrix-memory kernels (linear): LinearPlan", "fused decode step (step): StepPlan",
                 "momentum: True"):
        assert line in out, line
    assert main(["explain", "--plan", str(ROOT / "examples" / "titans.miras")]) == 0
    out = capsys.readouterr().out
    for line in ("fused decode step (step): StepMlpPlan", "depth: 2"):
        assert line in out, line
    assert main(["explain", "--plan", str(ROOT / "examples" / "memora.miras")]) == 0
    out = capsys.readouterr().out
    for line in ("fused decode step (step): StepMlpPlan", "base_map: True",
                 "MLP map read-out kernels (mlp_map): MlpMapPlan", "map: 'softmax'"):
        assert line in out, line


def test_format_plan_shortens_printed_code():
    text = format_plan(_plans("gated_deltanet").module.bias, name="bias")
    assert text.splitlines()[0] == "bias: BiasPlan"
    assert re.search(r"src: <\d+ lines> ", text)


def _functions(tree) -> list[str]:
    """Names of the functions defined at module level or under a module-level `if` (the Triton part)."""
    import ast

    names = []
    for node in tree.body:
        body = node.body + node.orelse if isinstance(node, ast.If) else [node]
        names += [n.name for n in body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    return [n for n in names if n != "_"]  # `_`: the anonymous functions torch.library decorators register


@pytest.mark.parametrize("stem", sorted(p.stem for p in (ROOT / "examples").glob("*.miras")))
def test_no_function_is_defined_twice_in_a_generated_module(stem):
    import ast

    source = compile_spec((ROOT / "examples" / f"{stem}.miras").read_text(), f"{stem}.miras").source
    names = _functions(ast.parse(source))
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
