"""The fused decode step's plan (mirasc/codegen/plan/step.py), without rendering: which flags, operands
and inputs example layers get, and the refusal reasons."""
from __future__ import annotations

from pathlib import Path

from mirasc.codegen.plan import Refusal
from mirasc.codegen.plan.step import StepPlan, plan_step
from mirasc.frontend import load_spec
from mirasc.symbolic.derive import derive

ROOT = Path(__file__).resolve().parent.parent


def _example(name: str):
    path = ROOT / "examples" / f"{name}.miras"
    return derive(load_spec(path.read_text(), str(path)))


def _layer(bias, decls, retention, lr, at="previous", memory="linear"):
    text = "\n".join(["layer P {", "    heads 2", "    key_dim 8", "    value_dim 8", f"    memory {memory}",
                      *("    " + d for d in decls), f"    bias {bias}", f"    retention {retention}",
                      f"    algorithm gd(lr={lr}, chunk=4, at={at})", "}"])
    return derive(load_spec(text, "p.miras"))


def test_gated_deltanet_reads_two_gates_and_retains():
    plan = plan_step(_example("gated_deltanet"))
    assert isinstance(plan, StepPlan)
    assert [(p.public, p.layout) for p in plan.inputs] == [("beta", "head"), ("alpha", "head")]
    assert plan.lr.input.public == "beta" and plan.lr.arg == plan.lr.input.name
    assert plan.decay.input.public == "alpha" and not plan.decay.channel
    assert plan.needs_y and plan.at_retained
    assert plan.bias_params == ()


def test_literal_operands_and_no_inputs():
    plan = plan_step(_layer("dot", [], "decay(0.9)", "0.5"))
    assert isinstance(plan, StepPlan)
    assert plan.inputs == () and plan.lr.arg == "None" and plan.decay.arg == "None"
    assert (plan.lr.lit, plan.decay.lit) == (0.5, 0.9)
    assert not plan.needs_y  # the dot bias's gradient does not read y


def test_retnet_decays_by_a_per_head_constant():
    plan = plan_step(_example("retnet"))
    assert isinstance(plan, StepPlan)
    assert [(p.public, p.layout) for p in plan.inputs] == [("gamma", "learnable")]
    assert plan.decay.input.public == "gamma" and plan.lr.input is None and plan.lr.lit == 1.0


def test_channel_operands_constant_lr_and_bias_parameters():
    plan = plan_step(_layer("huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)",
                                         "gate a : channel = sigmoid(rank=4, init=0.9)"],
                            "decay(a)", "0.3", at="retained"))
    assert isinstance(plan, StepPlan)
    assert plan.lr.input is None and plan.lr.lit == 0.3 and not plan.lr.channel
    assert plan.decay.channel and plan.at_retained
    assert [(p.public, p.channel) for p in plan.bias_params] == [("d", True)]
    assert {p.public for p in plan.inputs} == {"a", "d"}


def test_at_retained_needs_a_decay_and_an_input_is_listed_once():
    plan = plan_step(_layer("huber(d)", ["param d = learnable(0.5, softplus)"], "none", "d", at="retained"))
    assert isinstance(plan, StepPlan)
    assert not plan.at_retained  # without decay the retained point is the base itself
    assert plan.decay.input is None and plan.decay.lit == 1.0
    assert [(p.public, p.layout) for p in plan.inputs] == [("d", "learnable")]  # lr and bias parameter


def test_launch_table_covers_every_tile_the_kernel_accepts():
    plan = plan_step(_example("deltanet"))
    biggest = 1 << (plan.max_dim - 1).bit_length()
    assert plan.warps[-1][0] >= biggest * biggest
    assert [n for n, _ in plan.warps] == sorted(n for n, _ in plan.warps)
    assert "def _step_input(" in plan.library and "def _step_vecmat(" in plan.library


def test_refusals():
    for name in ("titans", "moneta"):  # MLP memories
        plan = plan_step(_example(name))
        assert isinstance(plan, Refusal) and "covers matrix memories only" in plan.reason, plan
    text = ("layer M {\n heads 2\n key_dim 8\n value_dim 8\n memory linear\n bias l2\n"
            " retention decay(0.9)\n algorithm momentum(beta=0.9, lr=0.5, chunk=4)\n}")
    momentum = derive(load_spec(text, "m.miras"))
    plan = plan_step(momentum)
    assert isinstance(plan, Refusal) and "does not cover momentum" in plan.reason
    plan = plan_step(_layer("l2", [], "decay(0.9) + lq(q=3)", "0.5"))  # no Triton kernels for the map
    assert isinstance(plan, Refusal) and "retention map 'lq'" in plan.reason
