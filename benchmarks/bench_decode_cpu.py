"""The host cost of decoding: a 24-layer causal LM with tiny widths on one CPU thread, so that the time per
token is the Python and dispatch work around the kernels (what bounds batch-1 decoding on a GPU too).

    PYTHONPATH=. python benchmarks/bench_decode_cpu.py [--specs gated_deltanet lp3 titans] [--layers 24]
        [--profile]

Each model (d_model 64, 2 heads of 16, byte vocabulary) decodes 64 new tokens after a 64-byte prompt
through the cache (`generate_bytes`, greedy) after a warm-up; the table gives ms per new token.
--profile adds cProfile's top functions of a 32-token run of the first spec.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirasc.lm.generate import generate_bytes
from mirasc.train.trainer import build_model, make_config

PROMPT = bytes(range(32, 96))


def model_for(spec: str, layers: int):
    torch.manual_seed(0)
    cfg = make_config(ROOT / "examples" / f"{spec}.miras", preset="cpu", layers=layers, d_model=64, heads=2,
                      head_dim=16)
    return build_model(cfg, 256).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="*", default=["gated_deltanet", "lp3", "titans"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"| model ({args.layers} layers, d_model 64, 2 x 16 heads, 1 CPU thread) | ms / token |")
    print("|---|---|")
    with torch.no_grad():
        for spec in args.specs:
            model = model_for(spec, args.layers)
            generate_bytes(model, PROMPT, max_new_tokens=4)  # warm-up
            ms = generate_bytes(model, PROMPT, max_new_tokens=64)[1]["ms_per_token"]
            print(f"| {spec} | {ms:.2f} |", flush=True)
        if args.profile:
            model = model_for(args.specs[0], args.layers)
            generate_bytes(model, PROMPT, max_new_tokens=4)
            prof = cProfile.Profile()
            prof.enable()
            generate_bytes(model, PROMPT, max_new_tokens=32)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
