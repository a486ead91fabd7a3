"""Moneta on the CPU: lq(norm=chunk) against lq(norm=token) and the same spec without lq (torch backend).

    python benchmarks/bench_lq_cpu.py [--threads 1] [--reps 9] [--token-reps 3] [--out FILE]
    python benchmarks/bench_lq_cpu.py --smoke    # tiny shapes, one repetition

examples/moneta.miras as shipped (lq(q=4), norm=chunk by default), with `lq(q=4, norm=token)`, and with
the lq term removed (retention decay(alpha) alone), at B=2, T=512, 4 heads of head dim 32 (K = V = 32,
d_model 128), its chunk size 64, float32, backend="torch". Timed: memory() forward + backward on fixed
random inputs (gates in (0.5, 1), a random initial state, every input differentiable) and the whole
block's forward + backward; the median and fastest of `reps` runs after a warm-up, the variants measured
in turns so load from other processes spreads over all of them (norm=token, the slow one, in the first
--token-reps rounds only). --threads 0 keeps torch's default thread count.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_torch_cpu import timed
from benchmarks.common import import_spec

LQ = "decay(alpha) + lq(q=4)"


def variants() -> dict:
    text = (ROOT / "examples/moneta.miras").read_text()
    assert LQ in text, "examples/moneta.miras no longer says " + LQ
    return {
        "lq(q=4), norm=chunk (the default)": text,
        "lq(q=4, norm=token)": text.replace(LQ, "decay(alpha) + lq(q=4, norm=token)"),
        "without lq: decay(alpha)": text.replace(LQ, "decay(alpha)"),
    }


def memory_step(module, ir, B, T, H, D, seed=0):
    """A closure running memory() forward + backward on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, D, generator=g).requires_grad_()
    gates = {p.name: (0.5 + 0.5 * torch.rand(B, T, H, generator=g)).requires_grad_()
             for p in ir.inputs() if p.kind == "gate"}
    dims = [D] + [ir.memory.expansion * D] * (ir.memory.depth - 1) + [D]
    state = tuple((torch.randn(B, H, a, b, generator=g) / a ** 0.5).requires_grad_()
                  for a, b in itertools.pairwise(dims))

    def run():
        o, final = module.memory(q, k, v, **gates, initial_state=state, output_final_state=True, backend="torch")
        (o.square().mean() + sum(s.square().mean() for s in final)).backward()
    return run


def block_step(layer, x):
    def run():
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x)
        y.square().mean().backward()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--token-reps", type=int, default=3, help="runs of the (slow) norm=token variant")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, H, D = (1, 70, 2, 8) if args.smoke else (2, 512, 4, 32)
    reps, token_reps = (1, 1) if args.smoke else (args.reps, args.token_reps)

    out = Path(tempfile.mkdtemp(prefix="bench_lq_cpu_"))
    mems, blocks = {}, {}
    x = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(1))
    for i, (name, text) in enumerate(variants().items()):
        module, ir = import_spec(text, "examples/moneta.miras", out, f"bench_lq_{i}_")
        mems[name] = memory_step(module, ir, B, T, H, D)
        torch.manual_seed(0)
        layer = getattr(module, ir.name)(H * D, heads=H, key_dim=D, value_dim=D, backend="torch")
        blocks[name] = block_step(layer, x)
    slow = "lq(q=4, norm=token)"
    mem_t = timed(mems, reps, slow, token_reps)
    blk_t = timed(blocks, reps, slow, token_reps)

    base = "without lq: decay(alpha)"
    cmd = "python benchmarks/bench_lq_cpu.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}`",
        "",
        (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, backend=\"torch\"; "
         f"B={B}, T={T}, {H} heads, K = V = {D}, d_model {H * D}, chunk 64. Forward + backward, {reps} runs "
         f"({token_reps} of norm=token) after a warm-up, in turns; seconds as fastest / median; ratios of "
         "the fastest runs against the spec without lq."),
        "",
        "| variant | memory() fwd+bwd (s) | vs without lq | block fwd+bwd (s) | vs without lq |",
        "|---|---|---|---|---|",
    ]
    for name in mems:
        (m_min, m_med, _), (b_min, b_med, _) = mem_t[name], blk_t[name]
        lines.append(f"| {name} | {m_min:.3f} / {m_med:.3f} | {m_min / mem_t[base][0]:.2f}x | "
                     f"{b_min:.3f} / {b_med:.3f} | {b_min / blk_t[base][0]:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
