"""Training throughput of mirasc's causal LM on one GPU, beside fla's Gated DeltaNet model in the same run.

    PYTHONPATH=. python benchmarks/train_throughput.py [--preset gpu-340m] [--batch 4] [--steps 4]
        [--specs gated_deltanet lp3 titans moneta] [--out results.md]

The model is the one `mirasc train --preset PRESET` builds (d_model, layers, heads, head dim and sequence
length of the preset, byte vocabulary of 256, backend "auto": the Triton kernels on CUDA) and one
optimizer step is what the trainer runs: forward + backward under bf16 autocast, gradient clipping,
AdamW. Inputs are random token ids (speed does not depend on the data). Each model runs 2 warm-up steps
(Triton compiles there), then --steps timed steps; the table gives the median tokens/s, the seconds per
step and the peak GPU memory. Then the model decodes: a prompt of --prompt random bytes, then 64 new
tokens, greedy, through the cache (`generate_bytes`, what `mirasc generate` runs; fla's through its
Hugging Face `generate`); the table gives ms per new token. fla's GatedDeltaNetForCausalLM (fla 0.6.0, when `import fla` works) runs
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


def decode_ms(name: str, model, prompt_len: int, new: int = 64) -> float:
    """Milliseconds per generated token after a prompt of prompt_len random bytes (greedy, batch 1)."""
    model.eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=gen)
    with torch.no_grad():
        if name.startswith("fla"):
            ids = prompt[None].cuda()

            def timed(n):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
                torch.cuda.synchronize()
                return time.perf_counter() - t0

            timed(2)  # warm-up (kernels compile)
            return (timed(new) - timed(1)) / (new - 1) * 1e3
        from mirasc.lm.generate import generate_bytes

        generate_bytes(model, bytes(prompt.tolist()), max_new_tokens=4)  # warm-up (kernels compile)
        return generate_bytes(model, bytes(prompt.tolist()), max_new_tokens=new)[1]["ms_per_token"]


def run(name: str, make, seq_len: int, batch: int, steps: int, prompt_len: int, compiled: bool = False) -> dict:
    """Time optimizer steps of one model (its forward under torch.compile when `compiled`, as
    `mirasc train --compile` runs it); returns its row (or the error's first line)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = make().cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(0, VOCAB, (batch, seq_len + 1), device="cuda")
    forward = torch.compile(model) if compiled else model
    times = []
    for i in range(2 + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(input_ids=ids[:, :-1]).logits
        if i == 0:
            torch.cuda.synchronize()
            print(f"  {name} step 0: forward done after {time.perf_counter() - t0:.1f} s", flush=True)
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
    if prompt_len:
        opt.zero_grad(set_to_none=True)
        try:
            row["decode_ms"] = decode_ms(name, model, prompt_len)
            print(f"  {name} decode: {row['decode_ms']:.2f} ms / token", flush=True)
        except Exception as exc:  # noqa: BLE001 -- reported in the table
            row["decode_ms"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            print(f"  {name} decode: {row['decode_ms']}", flush=True)
    del model, opt
    return row


def fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu-340m")
    ap.add_argument("--batch", type=int, default=4, help="rows per step (the preset's seq_len each)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--specs", nargs="*", default=["gated_deltanet", "lp3", "titans", "moneta"],
                    help="examples to train (none: only the peer)")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--fla-only", action="store_true", help="only the peer")
    ap.add_argument("--compile", action="store_true",
                    help="also time each spec with its forward under torch.compile (mirasc train --compile)")
    ap.add_argument("--fla-skip-hopper-check", action="store_true",
                    help="let fla 0.6.0 run its gated backward on Hopper with Triton < 3.7.1, which it refuses "
                         "(its issue #640: wrong gradients there): for its speed only; the row says so")
    ap.add_argument("--prompt", type=int, default=512, help="prompt bytes before decoding (0: no decoding)")
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
                                          VOCAB), False) for s in ([] if args.fla_only else args.specs)]
    if args.compile:
        makers += [(f"{name} (compiled)", make, True) for name, make, _ in makers]
    if not args.no_fla:
        try:
            import fla  # noqa: F401

            name = "fla GatedDeltaNet"
            if args.fla_skip_hopper_check:  # the check reads this module global; nothing else there does
                from fla.ops.common import chunk_o

                chunk_o.TRITON_ABOVE_3_7_1 = True
                name += " (Hopper check skipped: speed only, its gradients are not trusted)"
            makers.append((name, lambda: fla_gated_deltanet(p), False))
        except Exception as exc:  # noqa: BLE001 -- fla's wheels are optional (any import failure)
            print(f"fla not importable: {type(exc).__name__}: {exc}", flush=True)
    for name, make, compiled in makers:
        try:
            rows.append(run(name, make, seq_len, args.batch, args.steps, args.prompt, compiled=compiled))
        except Exception as exc:  # noqa: BLE001 -- one failing model must not stop the others
            msg = str(exc).splitlines()[0][:160] if str(exc) else ""
            print(f"  {name}: {type(exc).__name__}: {msg}", flush=True)
            rows.append({"model": name, "error": f"{type(exc).__name__}: {msg}"})
        torch.cuda.empty_cache()
    lines = [f"# Training throughput\n\n{head}\n", "| model | params (M) | s / step | tokens / s | peak GiB | decode ms / token |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | {r['error']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['s_per_step']:.3f} | {r['tok_s']:,.0f} | "
                         f"{r['peak_gib']:.1f} | {fmt(r.get('decode_ms', ''))} |")
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
