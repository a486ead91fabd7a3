"""Every example trains at its defaults: its block, in a tiny causal LM, learns a small corpus with a
finite, falling loss (the spec's own chunk size and gate inits; only the width is small)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import EXAMPLE_NAMES, EXAMPLES
from test_train import _corpus

STEPS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("path", EXAMPLES, ids=EXAMPLE_NAMES)
def test_example_trains(path, corpus, tmp_path):
    from mirasc.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(path, preset="tiny", d_model=32, layers=1, heads=2, head_dim=16, seq_len=64,
                    batch_size=4, steps=STEPS, lr=1e-2, warmup=2, eval_every=0, progress=False,
                    threads=1, backend="torch", data=str(corpus), out=str(tmp_path / "run"))
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, f"{path.name}: loss {first:.3f} -> {last:.3f}"
