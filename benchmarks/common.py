"""What the benchmark scripts share: compiling a spec into an importable module, the lp layer, the
relative error every agreement check reports, and the timer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from mirasc.compiler import compile_spec


def import_spec(text: str, name: str, out: Path, prefix: str):
    """Compile spec text (named `name` in errors), write the module into `out`, import it: (module, ir)."""
    compiled = compile_spec(text, name)
    path = out / f"{compiled.stem}.py"
    path.write_text(compiled.source)
    spec = importlib.util.spec_from_file_location(f"{prefix}{compiled.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, compiled.ir


def lp_decay_spec(heads: int, dim: int, chunk: int = 64) -> str:
    """The lp(p=3) layer with a data-dependent decay gate that the benchmark tables lead with."""
    return f"""layer LpDecay {{
    heads {heads}
    key_dim {dim}
    value_dim {dim}
    memory linear
    gate a : head = sigmoid(rank=32, init=0.97)
    gate eta : head = softplus(rank=32, init=0.1)
    bias lp(p=3)
    retention decay(a)
    algorithm gd(lr=eta, chunk={chunk})
}}
"""


def rel(a, b) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bf16_nudged(leaves: list, generator) -> list:
    """Float32 leaves (requiring grad) with q, k, v (the first three) moved by bf16 rounding: relative
    noise uniform in +-2^-9, half a bf16 ulp. How far a layer's gradients move under it is how well any
    kernel with bf16 inputs can agree with a float32 reference."""
    import torch
    out = []
    for i, x in enumerate(leaves):
        x = x.detach().float()
        if i < 3:
            x = x * (1 + 2 ** -9 * (2 * torch.rand(x.shape, device=x.device, generator=generator) - 1))
        out.append(x.clone().requires_grad_())
    return out


def median_ms(fn, dry_run: bool = False) -> float:
    """Median ms of triton.testing.do_bench; a dry run (the scripts' --smoke) calls fn once: nan."""
    if dry_run:
        fn()
        return float("nan")
    import triton
    return triton.testing.do_bench(fn)
