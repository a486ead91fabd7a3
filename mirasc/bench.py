"""`mirasc bench SPEC`: time a compiled layer's memory (forward, forward+backward, one decode step) on
every backend that applies, beside causal softmax attention, and print a markdown table.

Timings are medians over repeated runs after a warm-up (CUDA events on a GPU). They measure, they assert
nothing; benchmarks/ holds the scripts whose tables are committed.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .testing import compile_module, long_sequence_range, make_inputs, make_state


def _median_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_bench(spec_path: str, batch: int, seq: int, dtype: str, device: str, reps: int,
              out=sys.stdout) -> str:
    """Time the spec's layer; returns (and prints) the markdown table."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if dev.type == "cpu" and dt != torch.float32:
        dt = torch.float32  # half-precision matmuls are slow or missing on CPUs
    stem = Path(spec_path).stem
    module, compiled = compile_module(Path(spec_path).read_text(encoding="utf-8"), spec_path,
                                      tempfile.mkdtemp(prefix="mirasc-bench-"), f"mirasc_bench_{stem}")
    ir = compiled.ir
    B, T, H, K, V = batch, seq, ir.block.heads, ir.block.key_dim, ir.block.value_dim
    # q, k, v in the timed dtype; gates (in ranges stable over long sequences) and the state in float32
    q, k, v, params, g = make_inputs(ir, B, T, H, K, V, dtype=torch.float32, device=dev,
                                     ranges=long_sequence_range)
    q, k, v = (x.to(dt) for x in (q, k, v))
    state = make_state(ir, B, H, K, V, dtype=torch.float32, gen=g, device=dev)
    warmup = 3
    title = (f"# {ir.name}: B={B}, T={T}, H={H}, K={K}, V={V}, {str(dt).replace('torch.', '')}, {dev.type}, "
             f"chunk {ir.algorithm.chunk}")
    rows = [title, "", "| what | fwd ms | fwd+bwd ms |", "|---|---|---|"]
    print("\n".join(rows), file=out, flush=True)
    # MLP kernels in Triton's CPU interpreter take minutes at a spec's head dims: timed on CUDA only
    has_kernels = "_memory_triton" in vars(module) or ("_triton_mlp_memory" in vars(module) and dev.type == "cuda")
    backends = ["torch"] + (["triton"] if has_kernels else [])
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    for backend in backends:
        def run(backend=backend):
            return module.memory(*leaves, **params, initial_state=state, backend=backend)[0]

        def run_bwd(run=run):
            for x in leaves:
                x.grad = None
            run().float().sum().backward()
        try:
            with torch.no_grad():
                fwd = _median_ms(run, dev, warmup, reps)
            both = _median_ms(run_bwd, dev, warmup, reps)
        except (ValueError, NotImplementedError) as exc:
            rows.append(f"| memory, {backend} backend | n/a: {exc} | |")
        else:
            rows.append(f"| memory, {backend} backend | {fwd:.3f} | {both:.3f} |")
        print(rows[-1], file=out, flush=True)
    tok = {n: (p if p.dim() == 1 else p[:, 0]) for n, p in params.items()}
    dstate = module.decode_state(state)
    with torch.no_grad():
        ms = _median_ms(lambda: module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=dstate), dev, warmup, reps)
    rows.append(f"| one decode step | {ms:.4f} | |")
    print(rows[-1], file=out, flush=True)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def sdpa_bwd():
        for x in (qt, kt, vt):
            x.grad = None
        sdpa().float().sum().backward()
    with torch.no_grad():
        fwd = _median_ms(sdpa, dev, warmup, reps)
    rows.append(f"| causal softmax attention (SDPA), same shape | {fwd:.3f} | "
                f"{_median_ms(sdpa_bwd, dev, warmup, reps):.3f} |")
    print(rows[-1], file=out, flush=True)
    return "\n".join(rows) + "\n"
