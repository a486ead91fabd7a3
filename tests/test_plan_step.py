"""The fused decode step's plan (mirasc/codegen/plan/step.py), without rendering: which flags, operands
and inputs example layers get, and the refusal reasons."""
from __future__ import annotations

from pathlib import Path

import pytest

from mirasc.codegen.plan import Refusal
from mirasc.codegen.plan.step import StepMlpPlan, StepPlan, plan_step
from mirasc.frontend import load_spec
from mirasc.symbolic.derive import derive

ROOT = Path(__file__).resolve().parent.parent


def _example(name: str):
    path = ROOT / "examples" / f"{name}.miras"
    return derive(load_spec(path.read_text(), str(path)))


def _layer(bias, decls, retention, lr, at="previous", memory="linear", algorithm=None):
    text = "\n".join(["layer P {", "    heads 2", "    key_dim 8", "    value_dim 8", f"    memory {memory}",
                      *("    " + d for d in decls), f"    bias {bias}", f"    retention {retention}",
                      f"    algorithm {algorithm or f'gd(lr={lr}, chunk=4, at={at})'}", "}"])
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
    plan = plan_step(_example("memora"))  # an MLP memory with the kl map over the key axis: covered
    assert isinstance(plan, StepMlpPlan) and plan.map == "softmax" and plan.base_map and not plan.prox
    plan = plan_step(_layer("l2", [], "kl(axis=value)", "0.5", memory="mlp(depth=2, expansion=2, act=gelu)"))
    assert isinstance(plan, Refusal) and "covers kl over the key axis, not over 'value'" in plan.reason
    plan = plan_step(_layer("l2", ["gate a : head = sigmoid(rank=4, init=0.9)"], "decay(a) + lq(q=3, norm=token)",
                            "0.5", at="retained", memory="mlp(depth=2, expansion=2, act=gelu)"))
    assert isinstance(plan, Refusal) and "no lq map with at=retained" in plan.reason
    plan = plan_step(_layer("l2", [], "none", "0.5", memory="mlp(depth=3, expansion=2, act=gelu)"))
    assert isinstance(plan, Refusal) and "depth 1 and 2, got depth 3" in plan.reason


@pytest.mark.parametrize("axis", ["value", "all"])
def test_mlp_memories_with_kl_over_rows_keep_the_torch_step(axis):
    plan = plan_step(_layer("l2", [], f"kl(axis={axis})", "0.5", memory="mlp(depth=2, expansion=2, act=gelu)"))
    assert isinstance(plan, Refusal) and "the MLP step kernel covers kl over the key axis" in plan.reason
    # step() prints the reason in a string literal of a 110-column line, indented 12 spaces
    assert len(f'            "{plan.reason}")') <= 110


@pytest.mark.parametrize(("retention", "base_map", "prox"), [
    ("decay(0.9) + bregman", True, False), ("elastic_net(0.1, form=retain)", False, True),
    ("elastic_net(g, form=ftrl)", True, False)])
def test_mlp_memories_with_elementwise_maps_plan_the_step(retention, base_map, prox):
    """bregman and elastic_net have the MLP step kernel; form=retain's base is already W (no base map)
    and its chunk end stores S_gamma(Z'); a learnable threshold is one of the kernel's inputs."""
    plan = plan_step(_layer("l2", ["param g = learnable(0.1, softplus)"] if "(g" in retention else [], retention,
                            "0.5", memory="mlp(depth=2, expansion=2, act=gelu)"))
    assert isinstance(plan, StepMlpPlan) and (plan.base_map, plan.prox, plan.chunk_end) == (base_map, prox, prox)
    assert (plan.gamma.input is not None) == ("(g" in retention)


def test_titans_plans_the_mlp_step():
    plan = plan_step(_example("titans"))
    assert isinstance(plan, StepMlpPlan)
    assert (plan.depth, plan.act, plan.norm, plan.residual) == (2, "silu", False, True)
    assert plan.momentum and plan.needs_y and plan.forward and not plan.at_retained
    assert (plan.lr.input.public, plan.decay.input.public, plan.beta.input.public) == ("theta", "alpha", "eta")
    assert [p.public for p in plan.inputs] == ["theta", "eta", "alpha"] and plan.bias_params == ()
    assert plan.layers == (1, 2) and plan.names("z", "_ptr") == "z1_ptr, z2_ptr"
    assert plan.names_tuple("b") == "(b1, b2)"
    assert "def _bias_grad(" in plan.bias_src and "def _tl_dact(" in plan.activation_src
    assert "def _step_ln(" in plan.library and "def _step_vecmat(" in plan.library
    assert plan.map == "id" and not plan.lq_chunk and not plan.chunk_end
    assert "_mm" in plan.pasted  # the MLP chunk kernels' library: the step pastes none of it again


def test_moneta_plans_the_lq_step():
    plan = plan_step(_example("moneta"))  # lq(q=4), norm=chunk
    assert isinstance(plan, StepMlpPlan) and plan.map == "lq" and plan.lq_chunk and plan.chunk_end
    assert (plan.lq.q, plan.lq.qi, plan.lq.pw) == (4.0, 4, 0.5)
    assert "_lq_pow" in plan.pasted and "def _lq_pow(" not in plan.library  # the chunk kernels paste it
    assert "def _step_lq_r(" in plan.library
    plan = plan_step(_layer("l2", [], "lq(q=3, norm=token)", "0.5", memory="mlp(depth=2, expansion=2, act=gelu)"))
    assert plan.map == "lq" and not plan.lq_chunk and not plan.chunk_end
    assert "_lq_pow" in plan.pasted and "def _lq_pow(" not in plan.library  # the chunk kernels paste it
    assert "def _step_lq_r(" in plan.library


def test_mlp_step_variants():
    plan = plan_step(_example("ttt_linear"))  # depth 1: no activation, x + LN(x W), no retention
    assert isinstance(plan, StepMlpPlan) and plan.depth == 1 and plan.activation_src == ""
    assert plan.norm and plan.residual and not plan.momentum and plan.decay.arg == "None"
    assert plan.names_tuple("z") == "(z1,)"
    plan = plan_step(_example("yaad"))  # a bias parameter per head
    assert isinstance(plan, StepMlpPlan) and [p.public for p in plan.bias_params] == ["delta"]
    plan = plan_step(_layer("dot", ["param a = learnable(0.9, sigmoid)"], "decay(a)", "0.5", at="retained",
                            memory="mlp(depth=2, expansion=2, act=gelu, residual=false, norm=false)"))
    assert plan.at_retained and not plan.needs_y and not plan.forward  # y-independent, no LN: no forward
    assert plan.decay.input.layout == "learnable" and plan.lr.arg == "None" and plan.lr.lit == 0.5
    plan = plan_step(_layer("dot", [], "none", "0.5", at="retained",
                            memory="mlp(depth=2, expansion=2, act=gelu, residual=false, norm=true)"))
    assert plan.forward and not plan.at_retained  # the LayerNorm's backward needs z_L; no decay to retain


def test_gd_without_a_map_sets_no_new_flags():
    plan = plan_step(_example("gated_deltanet"))
    assert not plan.momentum and plan.beta.arg == "None"
    assert plan.map == "id" and not (plan.base_map or plan.prox or plan.lq_chunk or plan.chunk_end)
    assert plan.gamma.arg == "None" and plan.gamma.lit == 0.0


def test_momentum_reads_beta():
    plan = plan_step(_layer("l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                                   "gate b : channel = sigmoid(rank=4, init=0.8)"], "decay(a)", "0.5",
                            algorithm="momentum(beta=b, lr=0.5, chunk=4)"))
    assert isinstance(plan, StepPlan) and plan.momentum
    assert plan.beta.input.public == "b" and plan.beta.channel
    assert [p.public for p in plan.inputs] == ["a", "b"]
    plan = plan_step(_layer("l2", [], "none", "0.5", algorithm="momentum(beta=0.8, lr=0.5, chunk=4, at=retained)"))
    assert plan.momentum and plan.beta.arg == "None" and plan.beta.lit == 0.8
    assert plan.inputs == () and not plan.at_retained  # no decay: the retained point is the base


@pytest.mark.parametrize(("retention", "map_", "base_map", "prox", "lq_chunk"), [
    ("kl(axis=value, scale=2.0)", "softmax", True, False, False),
    ("decay(0.9) + bregman", "sigmoid", True, False, False),
    ("elastic_net(0.1, form=ftrl)", "soft_threshold", True, False, False),
    ("elastic_net(0.1, form=retain)", "soft_threshold", False, True, False),  # the base is the carried W
    ("lq(q=3)", "lq", True, False, True),
    ("lq(q=3, norm=token)", "lq", True, False, False),
    ("lq(q=2)", "id", False, False, False),  # lq with q = 2 is the identity
])
def test_retention_maps(retention, map_, base_map, prox, lq_chunk):
    plan = plan_step(_layer("l2", [], retention, "0.5"))
    assert isinstance(plan, StepPlan)
    assert (plan.map, plan.base_map, plan.prox, plan.lq_chunk) == (map_, base_map, prox, lq_chunk)
    assert plan.chunk_end == (prox or lq_chunk)
    assert "def _step_map(" in plan.library and "def _lq_pow(" in plan.library  # with its callees
    assert "def _bias_grad(" in plan.bias_src


def test_map_constants():
    plan = plan_step(_layer("l2", [], "kl(axis=all, scale=3.0)", "0.5"))
    assert (plan.kl_axis, plan.kl_scale) == ("all", 3.0)
    plan = plan_step(_layer("l2", [], "lq(q=3, eps=0.01)", "0.5"))
    assert (plan.lq.q, plan.lq.qi, plan.lq.eps) == (3.0, 3, 0.01)
    assert abs(plan.lq.pw - 1 / 3) < 1e-15 and abs(plan.lq.r0 - 100.0) < 1e-9  # 1 / eps at Z = 0
    plan = plan_step(_layer("l2", [], "lq(q=1.5)", "0.5"))
    assert plan.lq.qi == 0 and plan.lq.pw < 0 and plan.lq.r0 == 0.0  # an infinite norm at Z = 0 reads 0
    plan = plan_step(_layer("l2", ["gate g : channel = softplus(rank=4, init=0.1)"],
                            "elastic_net(g, form=retain)", "0.5"))
    assert plan.gamma.input.public == "g" and plan.gamma.channel
    assert [p.public for p in plan.inputs] == ["g"]
