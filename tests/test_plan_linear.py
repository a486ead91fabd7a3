"""The matrix-memory kernels' plan (mirasc.codegen.plan.linear), asserted without rendering: which
kernel pair, flags and launch settings example layers get, and why others are refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from mirasc import __version__
from mirasc.codegen.emit import plans
from mirasc.codegen.plan import Refusal
from mirasc.codegen.plan.linear import LIBRARY, LinearPlan, plan_linear
from mirasc.compiler import compile_spec

ROOT = Path(__file__).resolve().parent.parent


def _example(stem: str):
    path = ROOT / "examples" / f"{stem}.miras"
    return compile_spec(path.read_text(), path.name).ir


def _kernels(ir):
    """The module plan's KernelChoice (the fused-kernel decision and the launcher's operand sources)."""
    return plans(ir, __version__).module.kernels


def _spec(bias: str, decls: list[str], retention: str, algorithm: str, memory: str = "linear"):
    text = "\n".join(["layer P {", "    heads 2", "    key_dim 16", "    value_dim 16", f"    memory {memory}",
                      *("    " + d for d in decls), f"    bias {bias}", f"    retention {retention}",
                      f"    algorithm {algorithm}", "}"])
    return compile_spec(text, "p.miras").ir


def test_delta_rule_gets_the_wy_form():
    plan = plan_linear(_example("gated_deltanet"))
    assert isinstance(plan, LinearPlan)
    assert (plan.kernels, plan.wy, plan.needs_y, plan.momentum, plan.alpha_channel) == ("scalar", True, True,
                                                                                         False, False)
    assert plan.launch.tiling == "wy" and plan.launch.fp32_sub16_area == 128 * 64
    assert (plan.launch.num_warps, plan.launch.num_stages) == (4, None)
    assert plan.column_separable
    assert "def _bias_grad(" in plan.bias_src and "def _unit_tril_inverse(" in plan.library_src


def test_bias_independent_of_y_runs_fixed_tiles():
    plan = plan_linear(_example("mamba2"))
    assert plan.kernels == "scalar" and not plan.needs_y and not plan.wy
    assert plan.launch.tiling == "fixed"


def test_non_affine_bias_substitutes_chunk_by_chunk():
    plan = plan_linear(_example("cauchy"))
    assert plan.kernels == "scalar" and plan.needs_y and not plan.wy
    assert plan.launch.tiling == "substitute" and plan.launch.fp32_sub16_area == 128 * 128


def test_momentum_and_per_channel_decay_get_their_own_kernels():
    mom = plan_linear(_example("quantile"))
    assert mom.kernels == "momentum" and mom.momentum
    assert _kernels(_example("quantile")).beta is not None  # the launcher passes the momentum gate
    assert mom.launch.num_stages == 1 and mom.launch.num_warps == 8
    assert mom.launch.fp32_sub16_area == 128 * 64  # the momentum backward holds a state and its gradient more
    assert mom.launch.min_bv == 64  # the momentum kernels run no value tile under 64 columns on a GPU
    assert "def _momentum_weights(" in mom.library_src
    chan = plan_linear(_example("log_cosh"))
    assert chan.kernels == "channel" and chan.alpha_channel and not chan.wy
    assert (chan.launch.num_warps, chan.launch.num_stages) == (8, 1) and chan.launch.min_bv == 16
    assert "def _decay_mm_bwd(" in chan.library_src and "def _momentum_weights(" not in chan.library_src


def test_per_channel_lr_and_bias_parameters():
    ir = _spec("huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)", "param a = learnable(0.9, sigmoid)",
                            "gate eta : channel = softplus(rank=4, init=0.1)"],
               "decay(a)", "gd(lr=eta, chunk=16, at=retained)")
    plan = plan_linear(ir)
    assert plan.eta_channel and not plan.alpha_channel and not plan.wy and plan.at_retained
    assert [(p.public, p.kind) for p in plan.bias_params] == [("d", "channel")]
    launch = _kernels(ir)  # the launcher's operands, decided with the kernel choice
    assert launch.family == "linear" and launch.bias_args == ("gates['d'].float().contiguous()",)
    assert launch.alpha.startswith("gates['a']")  # a learnable scalar per head, expanded per token


def test_coupled_columns_are_not_separable():
    ir = _spec("huber_norm(d)", ["gate d : head = softplus(rank=4, init=1.0)"], "decay(0.9)",
               "gd(lr=0.1, chunk=16, at=previous)")
    assert plan_linear(ir).column_separable is False


@pytest.mark.parametrize(("stem", "reason"), [
    ("titans", "the triton backend covers matrix memories; MLP memories run on the torch backend"),
    ("moneta", "the triton backend covers matrix memories; MLP memories run on the torch backend"),
])
def test_mlp_memories_are_refused(stem, reason):
    assert plan_linear(_example(stem)) == Refusal(reason)


def test_momentum_with_per_channel_gates_is_refused():
    ir = _spec("l2", ["gate a : channel = sigmoid(rank=4, init=0.9)"], "decay(a)",
               "momentum(beta=0.9, lr=0.1, chunk=16, at=previous)")
    assert plan_linear(ir) == Refusal("momentum with a per-channel decay or momentum gate has no triton kernel yet")


def test_every_kernel_pair_names_library_functions():
    from mirasc.codegen import triton_lib

    for names in LIBRARY.values():
        assert set(names) <= set(triton_lib.names())
