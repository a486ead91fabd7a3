"""The plans -> the generated Python module (jinja2 templates in templates/, one partial per concern).

    source = emit_module(ir, mirasc.__version__)
    path = write_module(ir, "build/", "moneta")

Every decision is made in the plan stage (mirasc.codegen.plan): `plans(ir, version)` builds the module
plan and the plan of each kernel family, and this module only renders them. Templates read `m` (the
ModulePlan), `linear`, `mlp_plan`, `mlp_map` and `step` (the family plans, None where the layer has none); jinja
runs with StrictUndefined, so a template that reads a field no plan has fails instead of printing nothing.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .._resources import resource_dir
from ..ir import LayerIR
from .plan import Refusal
from .plan.linear import LinearPlan, plan_linear
from .plan.mlp import MlpPlan, plan_mlp
from .plan.mlp_map import MlpMapPlan, plan_mlp_map
from .plan.module import (
    CodegenError,
    ModulePlan,
    check_supported,
    choose_kernels,
    inverse_activation,
    plan_module,
)
from .plan.step import StepMlpPlan, StepPlan, plan_step


@dataclass(frozen=True)
class Plans:
    """Everything the templates read: the module plan and each kernel family's plan or refusal."""

    module: ModulePlan
    linear: LinearPlan | Refusal
    mlp: MlpPlan | Refusal | None  # None for a matrix memory
    mlp_map: MlpMapPlan | Refusal | None  # the map read-out of an MLP memory with kl / bregman / elastic_net
    step: StepPlan | StepMlpPlan | Refusal


def plans(ir: LayerIR, version: str) -> Plans:
    """The plans of a layer (CodegenError for an IR the generator cannot turn into a module)."""
    check_supported(ir)
    linear = plan_linear(ir)
    mlp = plan_mlp(ir) if ir.memory.kind == "mlp" else None
    mlp_map = plan_mlp_map(ir)
    step = plan_step(ir)
    return Plans(plan_module(ir, version, choose_kernels(ir, linear, mlp, step, mlp_map)), linear, mlp, mlp_map,
                 step)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def emit_module(ir: LayerIR, mirasc_version: str) -> str:
    """The generated module's source for one layer (self-contained: imports torch, math, typing)."""
    p = plans(ir, mirasc_version)
    kernels = p.module.kernels

    def chosen(plan, used: bool):
        return plan if used and not isinstance(plan, Refusal) else None

    return _environment().get_template("module.py.j2").render(
        m=p.module, linear=chosen(p.linear, kernels.linear), mlp_plan=chosen(p.mlp, kernels.mlp),
        mlp_map=chosen(p.mlp_map, kernels.mlp_map), step=chosen(p.step, kernels.step))


def write_module(ir: LayerIR, out_dir: str | os.PathLike, stem: str) -> Path:
    """Write `<out_dir>/<stem>.py` atomically (a temporary file in out_dir, then os.replace)."""
    from .. import __version__

    source = emit_module(ir, __version__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{stem}.py"
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


__all__ = ["CodegenError", "Plans", "emit_module", "inverse_activation", "plans", "write_module"]
