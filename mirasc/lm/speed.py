"""Decode speed of a MirascForCausalLM: one prefill, then one token per step through the cache."""
from __future__ import annotations

import time

import torch

from .model import output_cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_speed(model, prompt_len: int = 64, new_tokens: int = 32, batch: int = 1, seed: int = 0) -> dict:
    """Time greedy decoding of `new_tokens` steps after a random prompt of `prompt_len` tokens per row.

    Returns tokens_per_s (batch * new_tokens / decode time), ms_per_token (decode time per step, i.e.
    per token of one row) and prefill_ms. The first step runs untimed (warm-up).
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill = time.perf_counter() - start
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, cache=cache)  # warm-up step
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return {"tokens_per_s": batch * new_tokens / elapsed, "ms_per_token": 1e3 * elapsed / new_tokens,
            "prefill_ms": 1e3 * prefill, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
