"""The torch backend on the CPU: Gated DeltaNet (chunk 1) in the WY form, the token loop, and RetNet.

    python benchmarks/bench_torch_cpu.py [--threads 2] [--reps 7] [--out benchmarks/results/torch_wy_cpu.md]
    python benchmarks/bench_torch_cpu.py --smoke    # tiny shapes, one repetition

The whole block (projections, convolution, gates, memory, norm, output gate and projection) of
examples/gated_deltanet.miras and examples/retnet.miras at B=8, T=256, d_model=128, 2 heads of head dim
64, float32, backend="torch": the median of `reps` timed forward + backward passes (after a warm-up),
the layers measured in turns so that load from other processes spreads over all of them (the slow
token loop in the first --loop-reps rounds only); the table gives the fastest and the median. "token loop"
is the same generated Gated DeltaNet module with its _WY_BLOCK set to 1, which makes memory() take
the chunk loop with one token per chunk (the torch backend's path for chunk 1 before the WY form).
Agreement: the WY block's output and parameter gradients against the token loop's (relative error).
The memory() call alone is timed the same way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec, rel
from mirasc.testing import make_inputs


def block_step(layer, x):
    """One forward + backward of the block; returns the output and the parameters' gradients."""
    layer.zero_grad(set_to_none=True)
    y, _ = layer(x)
    y.square().mean().backward()
    return y.detach(), [p.grad.detach().clone() for p in layer.parameters() if p.grad is not None]


def memory_step(module, ir, B, T, H, D, seed=0):
    """A closure running memory() forward + backward on fixed random inputs (gates in (0.5, 1))."""
    q, k, v, gates, _ = make_inputs(ir, B, T, H, D, D, dtype=torch.float32, seed=seed, ranges=lambda p: (0.5, 1.0))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    gates = {n: x.requires_grad_() for n, x in gates.items()}

    def run():
        o, _ = module.memory(q, k, v, **gates, backend="torch")
        o.square().mean().backward()
    return run


def timed(fns: dict, reps: int, slow: str, slow_reps: int) -> dict:
    """(fastest, median) seconds of each closure, measured in turns (one call of each per round) after a
    warm-up, and the fewest CPU seconds (process time, all threads) of a run; the closure named slow runs
    in the first slow_reps rounds only. On a shared CPU the fastest run is the one least slowed by other
    processes; the CPU seconds leave out time spent off a core (not threads spinning for each other)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for r in range(reps):
        for name, fn in fns.items():
            if name == slow and r >= slow_reps:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (min(ts), statistics.median(ts), min(cpu[name])) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--loop-reps", type=int, default=3, help="runs of the (slow) token loop")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, T, d_model, H, D = (2, 70, 32, 2, 8) if args.smoke else (8, 256, 128, 2, 64)
    reps, loop_reps = (1, 1) if args.smoke else (args.reps, args.loop_reps)

    out = Path(tempfile.mkdtemp(prefix="bench_torch_cpu_"))
    gdn, gdn_ir = import_spec((ROOT / "examples/gated_deltanet.miras").read_text(),
                              "examples/gated_deltanet.miras", out, "bench_cpu_")
    ret, ret_ir = import_spec((ROOT / "examples/retnet.miras").read_text(), "examples/retnet.miras", out,
                              "bench_cpu_")
    torch.manual_seed(0)
    layers = {
        "gdn": gdn.GatedDeltaNet(d_model, heads=H, key_dim=D, value_dim=D, backend="torch"),
        "ret": ret.RetNet(d_model, heads=H, key_dim=D, value_dim=D, backend="torch"),
    }
    x = torch.randn(B, T, d_model, generator=torch.Generator().manual_seed(1))
    wy_block = gdn._WY_BLOCK

    def token_loop(fn):
        def run():
            gdn._WY_BLOCK = 1  # chunk 1 < 1 is false: memory() walks chunks of one token
            try:
                return fn()
            finally:
                gdn._WY_BLOCK = wy_block
        return run

    # agreement of the two Gated DeltaNet paths
    y_wy, g_wy = block_step(layers["gdn"], x)
    y_loop, g_loop = token_loop(lambda: block_step(layers["gdn"], x))()
    err_out = rel(y_wy, y_loop)
    err_grad = max(rel(a, b) for a, b in zip(g_wy, g_loop))

    blocks = timed({
        "Gated DeltaNet, WY form": lambda: block_step(layers["gdn"], x),
        "Gated DeltaNet, token loop": token_loop(lambda: block_step(layers["gdn"], x)),
        "RetNet (chunk 64)": lambda: block_step(layers["ret"], x),
    }, reps, "Gated DeltaNet, token loop", loop_reps)
    gdn_mem, ret_mem = memory_step(gdn, gdn_ir, B, T, H, D), memory_step(ret, ret_ir, B, T, H, D)
    mems = timed({
        "Gated DeltaNet, WY form": gdn_mem,
        "Gated DeltaNet, token loop": token_loop(gdn_mem),
        "RetNet (chunk 64)": ret_mem,
    }, reps, "Gated DeltaNet, token loop", loop_reps)

    ref = blocks["RetNet (chunk 64)"][0]
    ref_mem = mems["RetNet (chunk 64)"][0]
    cmd = "python benchmarks/bench_torch_cpu.py " + " ".join(sys.argv[1:])
    lines = [
        "# The torch backend on the CPU: Gated DeltaNet's WY form against the token loop and RetNet",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        (f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, backend=\"torch\"; "
         f"B={B}, T={T}, d_model={d_model}, heads {H}, head dim {D}. Forward + backward, {reps} runs "
         f"({loop_reps} of the token loop) after a warm-up, the rows measured in turns; seconds as fastest / median (the CPU is shared with other "
         "processes, so absolute times move between runs; compare within the table). The ratios are "
         "of the fastest runs. CPU s: the fewest process CPU seconds (all threads) of a run: time spent "
         "off a core does not count, but threads spinning while they wait for each other do."),
        "",
        "| layer | block fwd+bwd (s) | vs RetNet | block CPU s | memory() fwd+bwd (s) | vs RetNet | memory() CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in blocks:
        (b_min, b_med, b_cpu), (m_min, m_med, m_cpu) = blocks[name], mems[name]
        lines.append(f"| {name} | {b_min:.3f} / {b_med:.3f} | {b_min / ref:.2f}x | {b_cpu:.3f} | "
                     f"{m_min:.3f} / {m_med:.3f} | {m_min / ref_mem:.2f}x | {m_cpu:.3f} |")
    lines += [
        "",
        (f"WY form against the token loop (the same block, float32): output relative error {err_out:.1e}, "
         f"largest relative error of a parameter gradient {err_grad:.1e}."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
