"""Training throughput of mirasc's causal LM on one GPU, beside fla's Gated DeltaNet model in the same run.

    PYTHONPATH=. python benchmarks/train_throughput.py [--preset gpu-340m] [--batch 4] [--steps 4]
        [--specs gated_deltanet lp3 titans moneta] [--out results.md]

The model is the one `mirasc train --preset PRESET` builds (d_model, layers, heads, head dim and sequence
length of the preset, byte vocabulary of 256, backend "auto": the Triton kernels on CUDA) and one
optimizer step is what the trainer runs: forward + backward under bf16 autocast, gradient clipping,
AdamW. Inputs are random token ids (speed does not depend on the data). Each model runs 2 warm-up steps
(Triton compiles there), then --steps timed steps; the table gives the median tokens/s, the seconds per
step and the peak GPU memory. fla's GatedDeltaNetForCausalLM (fla 0.6.0, when `import fla` works) runs
with the same width, depth, heads, head dim (expand_v 1), vocabulary and loop.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirasc.train.presets import PRESETS
from mirasc.train.trainer import _param_groups, build_model, make_config

VOCAB = 256


def fla_gated_deltanet(p: dict) -> torch.nn.Module:
    """fla's Gated DeltaNet LM at the preset's shape (its own block: short conv, gates, output norm)."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    cfg = GatedDeltaNetConfig(hidden_size=p["d_model"], num_hidden_layers=p["layers"], num_heads=p["heads"],
                              head_dim=p["head_dim"], expand_v=1, vocab_size=VOCAB, tie_word_embeddings=True,
                              fuse_cross_entropy=False)
    return GatedDeltaNetForCausalLM(cfg)


def run(name: str, make, seq_len: int, batch: int, steps: int) -> dict:
    """Time optimizer steps of one model; returns its row (or the error's first line)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = make().cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(0, VOCAB, (batch, seq_len + 1), device="cuda")
    times = []
    for i in range(2 + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"  {name} step {i}: {dt:.3f} s, loss {loss.item():.3f}", flush=True)
        if i >= 2:
            times.append(dt)
    s = statistics.median(times)
    row = {"model": name, "params_m": n_params / 1e6, "s_per_step": s, "tok_s": batch * seq_len / s,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item()}
    del model, opt
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu-340m")
    ap.add_argument("--batch", type=int, default=4, help="rows per step (the preset's seq_len each)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--specs", nargs="*", default=["gated_deltanet", "lp3", "titans", "moneta"],
                    help="examples to train (none: only the peer)")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    seq_len = args.seq_len or p["seq_len"]
    head = (f"{torch.cuda.get_device_name()} · torch {torch.__version__} · preset {args.preset} "
            f"(d_model {p['d_model']}, {p['layers']} layers, {p['heads']} heads x {p['head_dim']}) · "
            f"{args.batch} x {seq_len} tokens per step · bf16 autocast · AdamW · vocabulary {VOCAB}")
    print(head, flush=True)
    rows = []
    makers = [(s, lambda s=s: build_model(make_config(ROOT / "examples" / f"{s}.miras", preset=args.preset),
                                          VOCAB)) for s in args.specs]
    if not args.no_fla:
        try:
            import fla  # noqa: F401

            makers.append(("fla GatedDeltaNet", lambda: fla_gated_deltanet(p)))
        except Exception as exc:  # noqa: BLE001 -- fla's wheels are optional (any import failure)
            print(f"fla not importable: {type(exc).__name__}: {exc}", flush=True)
    for name, make in makers:
        try:
            rows.append(run(name, make, seq_len, args.batch, args.steps))
        except Exception as exc:  # noqa: BLE001 -- one failing model must not stop the others
            msg = str(exc).splitlines()[0][:160] if str(exc) else ""
            print(f"  {name}: {type(exc).__name__}: {msg}", flush=True)
            rows.append({"model": name, "error": f"{type(exc).__name__}: {msg}"})
        torch.cuda.empty_cache()
    lines = [f"# Training throughput\n\n{head}\n", "| model | params (M) | s / step | tokens / s | peak GiB |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | {r['error']} | |")
        else:
            lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['s_per_step']:.3f} | {r['tok_s']:,.0f} | "
                         f"{r['peak_gib']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
