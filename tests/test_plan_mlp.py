"""The MLP kernels' plan (mirasc.codegen.plan.mlp) of the example specs and of a few variants, without
rendering: which kernels, flags, slots and launch settings each gets, and why others are refused."""
from __future__ import annotations

import ast

import pytest
from conftest import ROOT

from mirasc.codegen.plan import Refusal
from mirasc.codegen.plan.mlp import ACTIVATIONS, MlpPlan, plan_mlp
from mirasc.codegen.printers import triton_activation_source as activation_source
from mirasc.compiler import compile_spec


def _ir(example: str):
    return compile_spec((ROOT / "examples" / f"{example}.miras").read_text(), f"{example}.miras").ir


def _spec_ir(memory: str, retention: str, algorithm: str, decls=("gate eta : head = softplus(rank=4, init=0.1)",)):
    text = "\n".join(["layer P {", "    heads 2", "    key_dim 16", "    value_dim 16", f"    memory {memory}",
                      *("    " + d for d in decls), "    bias l2", f"    retention {retention}",
                      f"    algorithm {algorithm}", "}"])
    return compile_spec(text, "p.miras").ir


def _moneta_token():
    """Moneta with lq(norm=token): every token's read-out divides by its own state's norm."""
    text = (ROOT / "examples" / "moneta.miras").read_text().replace("lq(q=4)", "lq(q=4, norm=token)")
    return compile_spec(text, "moneta.miras").ir


def test_moneta_plan():
    """Moneta as shipped: depth 2, gelu, LN, residual, decay + lq(q=4) with norm=chunk (the default): one
    fused forward (the norm needs whole weight matrices, so no split heads), the lq constants as integers'
    products, the base and chunk-end norms (no per-token norm passes)."""
    plan = plan_mlp(_ir("moneta"))
    assert isinstance(plan, MlpPlan)
    assert (plan.depth, plan.act, plan.norm, plan.residual, plan.momentum) == (2, "gelu", True, True, False)
    assert plan.lq is not None
    assert (plan.lq.q, plan.lq.qi, plan.lq.pw, plan.lq.at0, plan.lq.chunk) == (4.0, 4, 0.5, 0.0, True)
    assert not plan.sliceable and not plan.split_forward and not plan.retained
    assert plan.kernels == ("_mlp_fwd_kernel", "_mlp_bwd_kernel")
    assert [(l.din, l.dout, l.off) for l in plan.layers] == [("K", "X", "0"), ("X", "V", "K * X")]
    assert "p1" in plan.bwd_slots and "za2" in plan.bwd_slots  # the read-out is recomputed
    assert plan.hidden_slots == ("za1", "dt1", "p1", "dp1", "da1", "dd1", "dz1")
    lib = plan.library_src
    assert "def _lq_chunk_end" in lib and "def _lq_chunk_vjp" in lib and "def _head_sum" not in lib
    assert "def _lq_token_norms" not in lib and "def _lq_norms_vjp" not in lib
    assert plan.flags == {"NORM": True, "RESIDUAL": True, "RETAINED": False, "LQ": True}


def test_kernel_flags_and_pointer_lines():
    """The kernels' constexpr flags follow the memory and the rule; slot and weight pointers are packed into
    lines of at most 98 columns, every slot once and in order."""
    titans = plan_mlp(_ir("titans"))
    assert titans.flags == {"NORM": False, "RESIDUAL": True, "RETAINED": False, "LQ": False}
    retained = plan_mlp(_spec_ir("mlp(depth=3, expansion=2, act=gelu, residual=false, norm=true)", "decay(0.9)",
                                 "gd(lr=eta, chunk=16, at=retained)"))
    assert retained.flags == {"NORM": True, "RESIDUAL": False, "RETAINED": True, "LQ": False}
    assert [l.off for l in retained.layers] == ["0", "K * X", "K * X + X * X"]
    lines = retained.slot_lines(retained.bwd_slots)
    assert all(len(line) <= 98 for line in lines) and len(lines) < len(retained.bwd_slots) / 2
    names = [n for line in lines for n in line.split(" = ")[0].split(", ")]
    exprs = [e for line in lines for e in line.split(" = ")[1].split(", ")]
    assert names == list(retained.bwd_slots)
    assert exprs[:3] == ["scr - x0", "scr + sz - x0", "scr + 2 * sz"]  # za1, za2 (hidden), za3 (V wide)


def test_moneta_token_plan():
    """lq(norm=token): the same kernels with the per-token norm passes instead of the chunk end's."""
    plan = plan_mlp(_moneta_token())
    assert isinstance(plan, MlpPlan) and plan.lq is not None and not plan.lq.chunk
    assert plan.kernels == ("_mlp_fwd_kernel", "_mlp_bwd_kernel")
    lib = plan.library_src
    assert "def _lq_token_norms" in lib and "def _lq_norms_vjp" in lib and "def _lq_chunk_end" not in lib


@pytest.mark.parametrize("norm", ["", ", norm=chunk"])
def test_lq_chunk_planned(norm):
    """lq(norm=chunk), the default, is planned (no refusal) with momentum and at depth 1 and 3."""
    for memory, algorithm in [("mlp(depth=1, expansion=1, act=gelu, residual=true, norm=true)", "gd(lr=eta, chunk=1)"),
                              ("mlp(depth=3, expansion=2, act=silu, residual=false, norm=false)",
                               "momentum(beta=0.9, lr=eta, chunk=64)")]:
        plan = plan_mlp(_spec_ir(memory, f"decay(0.9) + lq(q=3{norm})", algorithm))
        assert isinstance(plan, MlpPlan) and plan.lq is not None and plan.lq.chunk and plan.lq.qi == 3


def test_titans_plan():
    """Titans: momentum on a depth-2 memory: split heads in the backward, a fused forward."""
    plan = plan_mlp(_ir("titans"))
    assert isinstance(plan, MlpPlan)
    assert plan.momentum and plan.sliceable and not plan.split_forward and plan.lq is None
    assert plan.kernels == ("_mlp_fwd_kernel", "_mlp_bwd_kernel")
    assert (plan.fwd_launch.xs, plan.bwd_launch.xs, plan.bwd_launch.bxf) == (0, 128, 32)
    assert plan.read_launch is None
    assert "def _momentum_coefs" in plan.library_src and "def _head_sum" in plan.library_src


def test_yaad_plan_splits_the_forward():
    """gd on a depth-2 memory without lq: the writes and the read-out kernels, whose stored rows replace
    three of the backward's scratch slots."""
    plan = plan_mlp(_ir("yaad"))
    assert isinstance(plan, MlpPlan)
    assert plan.split_forward and plan.sliceable and not plan.momentum
    assert plan.kernels == ("_mlp_write_kernel", "_mlp_read_kernel", "_mlp_bwd_kernel")
    assert not {"p1", "p2", "za2"} & set(plan.bwd_slots)
    assert plan.read_launch is not None and plan.read_launch.source() == (
        '{"BX": 32, "XS": 0, "num_warps": 4, "num_stages": 2, "maxnreg": 0}')
    assert plan.bwd_launch.source() == (
        '{"BX": 64, "BXF": 64, "XS": 0, "num_warps": 8, "num_stages": 1, "maxnreg": 0}')


def test_variant_flags():
    retained = plan_mlp(_spec_ir("mlp(depth=3, expansion=2, act=silu, residual=true, norm=false)", "decay(0.9)",
                                 "gd(lr=eta, chunk=16, at=retained)"))
    assert isinstance(retained, MlpPlan) and retained.retained and not retained.sliceable
    assert [(l.din, l.dout) for l in retained.layers] == [("K", "X"), ("X", "X"), ("X", "V")]
    # at=retained without decay is at=previous
    plain = plan_mlp(_spec_ir("mlp(depth=2, expansion=2, act=relu, residual=true, norm=true)", "none",
                              "gd(lr=eta, chunk=16, at=retained)"))
    assert isinstance(plain, MlpPlan) and not plain.retained
    channel = plan_mlp(_spec_ir("mlp(depth=1, expansion=1, act=tanh, residual=true, norm=true)", "none",
                                "gd(lr=eta, chunk=8)", decls=("gate eta : channel = softplus(rank=4, init=0.1)",)))
    assert isinstance(channel, MlpPlan) and channel.eta_channel
    fractional = plan_mlp(_spec_ir("mlp(depth=2, expansion=1, act=gelu, residual=true, norm=true)", "lq(q=2.5, norm=token)",
                                   "gd(lr=eta, chunk=16)"))
    assert isinstance(fractional, MlpPlan) and fractional.lq.qi == 0 and fractional.lq.q == 2.5


@pytest.mark.parametrize("example, why", [
    ("memora", "the retention map 'softmax' has no triton kernel"),
    ("deltanet", "not an MLP memory"),
])
def test_examples_refused(example, why):
    plan = plan_mlp(_ir(example))
    assert isinstance(plan, Refusal) and why in plan.reason


@pytest.mark.parametrize("retention, algorithm, why", [
    ("lq(q=1.5)", "gd(lr=eta, chunk=16)", "lq retention with q < 2 has no triton kernel"),
    ("decay(0.9) + lq(q=4, norm=token)", "gd(lr=eta, chunk=16, at=retained)",
     "at=retained with a non-identity retention map has no triton kernel"),
])
def test_variants_refused(retention, algorithm, why):
    plan = plan_mlp(_spec_ir("mlp(depth=2, expansion=2, act=gelu, residual=true, norm=true)", retention, algorithm))
    assert isinstance(plan, Refusal) and why in plan.reason


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_source_defines_the_three_functions(act):
    tree = ast.parse(activation_source(act))
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert names == ["_tl_act", "_tl_dact", "_tl_d2act"]
    assert all(len(n.args.args) == 1 for n in tree.body)
