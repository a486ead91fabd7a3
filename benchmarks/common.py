"""What the benchmark scripts share beyond mirasc/testing.py (compiling a spec, drawing inputs, the
relative error `rel`): the lp layer the tables lead with, bf16-nudged leaves and the timer."""
from __future__ import annotations

from pathlib import Path

from mirasc.testing import compile_module, long_sequence_range, rel  # noqa: F401 - scripts import rel here


def import_spec(text: str, name: str, out: Path, prefix: str):
    """Compile spec text (named `name` in errors) into module <prefix><stem> in `out`: (module, ir)."""
    module, compiled = compile_module(text, name, out, prefix=prefix)
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


def peak_mib(fn, dry_run: bool = False) -> float:
    """Memory allocated by one call of fn beyond what was live before it (MiB): fwd+bwd's working set. A
    dry run (the scripts' --smoke), or a call that fails, gives nan, reported as missing like a failed
    timing."""
    if dry_run:
        return float("nan")
    import torch
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception:  # noqa: BLE001 - reported as missing
        return float("nan")


def median_ms(fn, dry_run: bool = False) -> float:
    """Median ms of triton.testing.do_bench; a dry run (the scripts' --smoke) calls fn once: nan."""
    if dry_run:
        fn()
        return float("nan")
    import triton
    return triton.testing.do_bench(fn)


def stable_ranges(ir):
    """Gate ranges stable over thousands of tokens: mirasc.testing.long_sequence_range, except that under
    momentum a gate used as the learning rate lies in (0.02, 0.1) * min(1, 4 / chunk) and the momentum
    gate in (0.5, 0.9), so that a chunk's summed step lr * chunk / (1 - momentum) stays small (the
    lp(p=3) layer with momentum at chunk 64 diverges with lr 0.1 on every backend)."""
    alg = ir.algorithm

    def pick(p):
        if alg.kind == "momentum" and p.name == alg.lr:
            return 0.02 * min(1.0, 4 / alg.chunk), 0.1 * min(1.0, 4 / alg.chunk)
        if alg.kind == "momentum" and p.name == alg.beta:
            return 0.5, 0.9
        return long_sequence_range(p)
    return pick
