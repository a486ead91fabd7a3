"""Where one training step of the causal LM spends its time: the kernels of one optimizer step, grouped
by what they do, for mirasc's model and (with --fla) fla's Gated DeltaNet model at the same shape.

    PYTHONPATH=. python benchmarks/profile_lm.py [--spec gated_deltanet] [--preset gpu-340m] [--batch 4]
        [--fla] [--layers N] [--out FILE]

The step is train_throughput.py's (bf16 autocast forward, backward, clipping, AdamW), after 2 warm-up
steps. torch.profiler records it; the table lists the 25 kernels (or CPU ops, without CUDA) with the most
device time, and a summary by group: the memory layer's Triton kernels, matrix products, the short
convolution, normalisations, elementwise and copies, the optimizer. The model's peak memory is printed
too. Without CUDA it runs on the CPU (tiny shapes make sense there: --preset cpu).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import VOCAB, fla_gated_deltanet
from mirasc.train.presets import PRESETS
from mirasc.train.trainer import _param_groups, build_model, make_config

GROUPS = [  # (group, pattern over the kernel or op name), first match wins
    ("mirasc memory kernels (Triton)", r"_chunk_|_mlp_|_nonfinite|_step_kernel"),
    ("fla Triton kernels", r"chunk_|fused_|l2norm|causal_conv|layer_norm_fwd|layer_norm_bwd|rms"),
    ("matrix products", r"gemm|matmul|mm\b|addmm|bmm|cutlass|sm90_xmma|nvjet|ampere_|cublas"),
    ("convolution", r"conv|depthwise|cudnn"),
    ("normalisation and reductions", r"norm|reduce|mean|sum"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("copies and casts", r"copy|cat|to_copy|contiguous|transpose|clone"),
    ("elementwise", r"elementwise|vectorized|silu|sigmoid|mul|add|div|exp|where|fill"),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "other")


def profile(name: str, model: torch.nn.Module, seq_len: int, batch: int, device: str) -> list[str]:
    """Profile one optimizer step after two warm-up steps -> the report's lines."""
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=3e-4, fused=device == "cuda")
    ids = torch.randint(0, VOCAB, (batch, seq_len + 1), device=device)
    cuda = device == "cuda"

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in events if time_of(e) > 0]
    total = sum(time_of(e) for e in events)
    lines = [f"## {name}", "", f"{'device' if cuda else 'CPU'} time of one step: {total / 1e3:.1f} ms"
             + (f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""), "",
             "| group | ms | share |", "|---|---|---|"]
    by_group = defaultdict(float)
    for e in events:
        by_group[group_of(e.key)] += time_of(e)
    for g, t in sorted(by_group.items(), key=lambda x: -x[1]):
        lines.append(f"| {g} | {t / 1e3:.2f} | {100 * t / total:.1f}% |")
    lines += ["", "| kernel / op | group | calls | ms |", "|---|---|---|---|"]
    for e in sorted(events, key=time_of, reverse=True)[:25]:
        key = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"| `{key}` | {group_of(e.key)} | {e.count} | {time_of(e) / 1e3:.2f} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="gated_deltanet", help="an example's name or a spec file")
    ap.add_argument("--preset", default="gpu-340m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--fla", action="store_true", help="also fla's Gated DeltaNet model (fla 0.6.0)")
    ap.add_argument("--fla-skip-hopper-check", action="store_true", help="as in train_throughput.py")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = dict(PRESETS[args.preset])
    if args.layers:
        p["layers"] = args.layers
    seq_len = args.seq_len or p["seq_len"]
    spec = Path(args.spec) if Path(args.spec).exists() else ROOT / "examples" / f"{args.spec}.miras"
    cfg = make_config(spec, preset=args.preset, layers=p["layers"])
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [(f"# One training step, profiled: preset {args.preset} ({p['layers']} layers, d_model "
              f"{p['d_model']}), {args.batch} x {seq_len} tokens, bf16 autocast, {where}"), ""]
    lines += profile(f"mirasc {spec.stem}", build_model(cfg, VOCAB).to(device), seq_len, args.batch, device)
    if args.fla:
        if args.fla_skip_hopper_check:
            from fla.ops.common import chunk_o

            chunk_o.TRITON_ABOVE_3_7_1 = True
        lines += profile("fla GatedDeltaNetForCausalLM", fla_gated_deltanet(p).to(device), seq_len, args.batch,
                         device)
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
