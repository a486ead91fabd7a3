"""mirasc.lm on a GPU: generate() against the full forward, batched prompts against each alone, packed
documents against separate calls (Triton kernels under backend="auto"), then decode speed of 12-layer
d_model 768 models in fp32 and bf16.

    PYTHONPATH=. python benchmarks/gpu_lm_check.py

Prints one line per check and per timing; nothing is asserted (read the lines: "greedy==full True",
"rows==alone True", and a relative packed-separate difference at the dtype's rounding).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

from mirasc import lm

DEV = "cuda"
SPECS = {n: Path(f"examples/{n}.miras").read_text() for n in ("gated_deltanet", "moneta", "retnet")}


def model(spec: str, **kw) -> lm.MirascForCausalLM:
    """A small model with large initial weights, so that greedy choices are far from ties."""
    base = {"spec": SPECS[spec], "spec_file": f"{spec}.miras", "hidden_size": 128, "num_hidden_layers": 2,
            "heads": 2, "head_dim": 64, "initializer_range": 0.5, "pad_token_id": 0}
    torch.manual_seed(0)
    return lm.MirascForCausalLM(lm.MirascConfig(**{**base, **kw})).to(DEV).eval()


def check(name: str, m: lm.MirascForCausalLM, plen: int = 70, steps: int = 12) -> None:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 256, (1, plen), generator=g).to(DEV)
    out = m.generate(prompt, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                     output_logits=True)
    ids, errs = prompt, []
    with torch.no_grad():
        for s in range(steps):
            logits = m(input_ids=ids).logits[:, -1]
            errs.append((logits - out.logits[s]).abs().max().item())
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    same = torch.equal(out.sequences, ids)
    # left-padded prompts of different lengths against each prompt alone
    lens = [plen, plen - 5, plen + 9, plen - 3]
    prompts = [torch.randint(1, 256, (1, n), generator=g).to(DEV) for n in lens]
    T = max(lens)
    batch = torch.zeros(len(prompts), T, dtype=torch.long, device=DEV)
    mask = torch.zeros_like(batch)
    for b, p in enumerate(prompts):
        batch[b, T - p.shape[1]:] = p[0]
        mask[b, T - p.shape[1]:] = 1
    together = m.generate(batch, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    rows_ok = all(torch.equal(together[b, T:], m.generate(p, max_new_tokens=steps, do_sample=False)[0, p.shape[1]:])
                  for b, p in enumerate(prompts))
    # packed documents against separate calls
    docs = [torch.randint(1, 256, (1, n), generator=g).to(DEV) for n in (100, 37, 64, 5)]
    cu = torch.tensor([0, 100, 137, 201, 206], dtype=torch.int32, device=DEV)
    with torch.no_grad():
        packed = m(input_ids=torch.cat(docs, 1), cu_seqlens=cu).logits
        separate = torch.cat([m(input_ids=d).logits for d in docs], 1)
    rel = ((packed - separate).abs().max() / separate.abs().max()).item()
    print(f"{name}: greedy==full {same} max|dlogit| {max(errs):.2e}; rows==alone {rows_ok}; "
          f"packed-separate {rel:.2e} (relative)", flush=True)


def main() -> None:
    print("transformers", transformers.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
    check("gdn chunk1", model("gated_deltanet"))
    check("retnet hybrid window", model("retnet", attn_every=2, attn_window=16))
    check("moneta chunk16 hybrid", model("moneta", chunk_size=16, attn_every=2))
    print("decode speed (greedy, prompt 512, 128 new tokens):", flush=True)
    for spec, kw in [("gated_deltanet", {}), ("gated_deltanet", {"attn_every": 4}), ("retnet", {}), ("moneta", {})]:
        for dtype in (torch.float32, torch.bfloat16):
            cfg = dict(spec=SPECS[spec], spec_file=f"{spec}.miras", hidden_size=768, num_hidden_layers=12,
                       heads=12, head_dim=64, **kw)
            torch.manual_seed(0)
            m = lm.MirascForCausalLM(lm.MirascConfig(**cfg)).to(DEV, dtype).eval()
            n = sum(p.numel() for p in m.parameters()) / 1e6
            for batch in (1, 16):
                r = lm.decode_speed(m, prompt_len=512, new_tokens=128, batch=batch)
                print(f"  {spec}{'-H4' if kw else ''} {n:.0f}M {str(dtype)[6:]} batch {batch}: "
                      f"{r['ms_per_token']:.2f} ms/token, {r['tokens_per_s']:.0f} tok/s, "
                      f"prefill {r['prefill_ms']:.0f} ms", flush=True)
            del m


if __name__ == "__main__":
    main()
