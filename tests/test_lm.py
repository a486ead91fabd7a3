"""mirasc.lm: the causal LM around a generated block, checked against independent oracles.

generate() with the recurrent cache against re-running the whole forward on the growing sequence;
batched, left-padded prompts against each prompt alone; packed documents against separate forwards;
save/load through AutoModelForCausalLM; gradients; the sliding window against a naive attention.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from conftest import ROOT

from mirasc import lm

SPECS = {name: (ROOT / "examples" / f"{name}.miras").read_text() for name in ("gated_deltanet", "moneta")}


@pytest.fixture(autouse=True, scope="module")
def _fresh_cache_one_thread(tmp_path_factory):
    """Compile into a fresh cache, so a module left by an older mirasc is never imported; one CPU thread
    (these models are tiny: more threads only contend for a shared machine)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MIRASC_CACHE", str(tmp_path_factory.mktemp("mirasc_cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def make_model(spec="gated_deltanet", seed=0, **overrides):
    """A tiny model with large random weights, so greedy choices are far from ties."""
    kwargs = {"spec": SPECS[spec], "spec_file": f"{spec}.miras", "hidden_size": 32, "num_hidden_layers": 2,
              "heads": 2, "head_dim": 8, "initializer_range": 0.5, "pad_token_id": 0, "backend": "torch"}
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return lm.MirascForCausalLM(lm.MirascConfig(**kwargs)).eval()


# chunk-1 delta rule; an MLP memory (lp bias, chunk 4, so prompts cross chunk boundaries); hybrids
CASES = {
    "gdn": {"spec": "gated_deltanet"},
    "moneta_c4": {"spec": "moneta", "chunk_size": 4},
    "gdn_hybrid": {"spec": "gated_deltanet", "attn_every": 2},
    "moneta_c4_hybrid_window": {"spec": "moneta", "chunk_size": 4, "attn_every": 2, "attn_window": 5},
}


@torch.no_grad()
def greedy_by_full_forward(model, prompt, steps):
    """The oracle: the whole forward (no cache) on the growing sequence, argmax of the last logits."""
    ids, logits = prompt, []
    for _ in range(steps):
        last = model(input_ids=ids).logits[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
    return ids, logits


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generate_equals_full_forward(case):
    model = make_model(**CASES[case])
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 256, (1, 7), generator=gen)  # 7 = one chunk of 4 and 3 tokens of the next
    steps = 8
    out = model.generate(prompt, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    ids, logits = greedy_by_full_forward(model, prompt, steps)
    assert torch.equal(out.sequences, ids)
    for got, want in zip(out.logits, logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert isinstance(out.cache if "cache" in out else out.past_key_values, (lm.MirascCache, type(None)))


def left_pad(prompts):
    """[1, n_i] prompts -> (ids, attention_mask) [B, max n], pads (token 0, mask 0) on the left."""
    T = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - p.shape[1]:] = p[0]
        mask[b, T - p.shape[1]:] = 1
    return ids, mask


@pytest.mark.parametrize("case", ["gdn", "moneta_c4", "moneta_c4_hybrid_window"])
def test_batched_left_padded_prompts_equal_each_prompt_alone(case):
    model = make_model(**CASES[case])
    gen = torch.Generator().manual_seed(2)
    # positions 1, 2, 3, 1 in chunks of 4: rows {0, 3}, {1}, {2}; chunk 1: one group, rows out of order
    lengths = [5, 10, 7, 9]
    prompts = [torch.randint(1, 256, (1, n), generator=gen) for n in lengths]
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    steps = 6
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    for b, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
        assert torch.equal(batched.sequences[b, T:], alone.sequences[0, p.shape[1]:]), f"row {b}"
        for got, want in zip(batched.logits, alone.logits):
            torch.testing.assert_close(got[b], want[0], atol=1e-4, rtol=1e-4)
    # without the cache (the whole padded batch re-run every step), pads never reach a memory either
    nocache = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=False)
    assert torch.equal(nocache, batched.sequences)


def test_padding_never_changes_a_row():
    """Whatever token the pads hold, a row's logits at its real positions are the same."""
    model = make_model(**CASES["moneta_c4_hybrid_window"])
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    other = ids.clone()
    other[0, :4] = torch.randint(1, 256, (4,), generator=gen)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=other, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, 4:]).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0, 4:], alone[0], atol=1e-5, rtol=1e-5)


def test_beam_search_with_cache_equals_without():
    """Beam search reorders the cache's rows (across chunk-position groups); the oracle has no cache."""
    model = make_model(**CASES["moneta_c4_hybrid_window"])
    gen = torch.Generator().manual_seed(4)
    ids, mask = left_pad([torch.randint(1, 256, (1, n), generator=gen) for n in (6, 3)])
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "num_beams": 3,
              "num_return_sequences": 2}
    with_cache = model.generate(ids, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("case", ["gdn_hybrid", "moneta_c4_hybrid_window"])
def test_packed_documents_equal_separate_forwards(case):
    model = make_model(**CASES[case])
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, 256, (1, n), generator=gen) for n in (6, 3, 9, 1)]
    packed = torch.cat(docs, 1)
    cu = torch.tensor([0, *torch.tensor([d.shape[1] for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        out = model(input_ids=packed, labels=packed, cu_seqlens=cu)
        separate = [model(input_ids=d).logits for d in docs]
    torch.testing.assert_close(out.logits, torch.cat(separate, 1), atol=1e-4, rtol=1e-4)
    # the loss: every document predicts its own next tokens, nothing across a boundary
    nll = [torch.nn.functional.cross_entropy(lg[0, :-1], d[0, 1:], reduction="sum")
           for lg, d in zip(separate, docs)]
    count = sum(d.shape[1] - 1 for d in docs)
    torch.testing.assert_close(out.loss, sum(nll) / count, atol=1e-5, rtol=1e-5)


def test_loss_is_shifted_cross_entropy_with_ignored_labels():
    model = make_model()
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 256, (2, 8), generator=gen)
    labels = ids.clone()
    labels[0, 3] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    lp = out.logits.log_softmax(-1)
    terms = [-lp[b, t, labels[b, t + 1]] for b in range(2) for t in range(7) if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = make_model(**CASES["moneta_c4_hybrid_window"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "moneta.miras").read_text() == SPECS["moneta"]
    assert json.loads((tmp_path / "config.json").read_text())["spec"] == SPECS["moneta"]
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), lm.MirascConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, lm.MirascForCausalLM)
    want = dict(model.state_dict())
    got = dict(loaded.state_dict())
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(value, got[name]), name
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_reach_every_parameter(packed):
    """Finite, nonzero gradients everywhere; gradient checkpointing recomputes them exactly."""
    model = make_model(**CASES["moneta_c4_hybrid_window"]).train()
    gen = torch.Generator().manual_seed(8)
    if packed:
        ids = torch.randint(1, 256, (1, 13), generator=gen)
        kwargs = {"cu_seqlens": torch.tensor([0, 5, 13], dtype=torch.int32)}
    else:
        ids = torch.randint(1, 256, (2, 9), generator=gen)
        kwargs = {}
    out = model(input_ids=ids, labels=ids, **kwargs)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
        grads[name] = p.grad.clone()
    model.zero_grad()
    # activation_checkpointing_enable is the newer transformers' name of gradient_checkpointing_enable
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model(input_ids=ids, labels=ids, **kwargs).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_sliding_window_attention_against_naive_softmax():
    from mirasc.lm.model import MirascAttention, apply_rope

    config = lm.MirascConfig(spec=None, hidden_size=16, attn_window=3)
    torch.manual_seed(9)
    attn = MirascAttention(config, heads=2)
    x = torch.randn(1, 7, 16)
    y, _ = attn(x)
    pos = torch.arange(7)
    q, k, v = (p(x).view(1, 7, 2, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rope(q, pos, config.rope_theta), apply_rope(k, pos, config.rope_theta)
    rows = []
    for i in range(7):
        keys = range(max(0, i - 2), i + 1)  # itself and the 2 tokens before: a window of 3
        s = torch.stack([(q[:, :, i] * k[:, :, j]).sum(-1) for j in keys], -1) / math.sqrt(8)
        w = s.softmax(-1)
        rows.append(sum(w[..., n, None] * v[:, :, j] for n, j in enumerate(keys)))
    o = torch.stack(rows, 2).transpose(1, 2).reshape(1, 7, 16)
    torch.testing.assert_close(y, attn.o_proj(o), atol=1e-5, rtol=1e-5)


def test_rope_rotates_by_relative_position():
    """<R(m) q, R(n) k> depends on m - n only: the property RoPE exists for."""
    from mirasc.lm.model import apply_rope

    torch.manual_seed(10)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        return (apply_rope(q, torch.tensor([m]), 1e4) * apply_rope(k, torch.tensor([n]), 1e4)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_decode_speed_reports_rates():
    model = make_model()
    r = lm.decode_speed(model, prompt_len=5, new_tokens=3, batch=2)
    assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * 1e3 / r["ms_per_token"])


def test_generate_command_prints_the_greedy_continuation(tmp_path, capsys):
    from mirasc.cli import main
    from mirasc.lm.generate import generate_bytes

    model = make_model(**CASES["gdn_hybrid"])
    model.save_pretrained(tmp_path / "checkpoint-2")
    model.save_pretrained(tmp_path / "checkpoint-10")
    prompt = b"def f(x):"
    want = model.generate(torch.tensor([list(prompt)]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
    text, timing = generate_bytes(model, prompt, max_new_tokens=6)
    assert text == bytes(want.tolist()) and timing["ms_per_token"] > 0
    assert main(["generate", str(tmp_path), "--prompt", prompt.decode(), "--max-new-tokens", "6",
                 "--greedy", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out == (prompt + text).decode("utf-8", errors="replace") + "\n"
    assert "checkpoint-10" in out.err and "ms/token" in out.err


def test_cache_continues_by_several_tokens_at_once():
    """Prefill a padded batch, then feed 6 tokens per row in one call: each row's logits equal one forward
    over its real prompt and the new tokens (chunks of 4 cross the call boundary at different places)."""
    from mirasc.lm.model import output_cache

    model = make_model(**CASES["moneta_c4_hybrid_window"])
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 256, (1, n), generator=gen) for n in (3, 6, 9)]
    ids, mask = left_pad(prompts)
    more = torch.randint(1, 256, (3, 6), generator=gen)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = output_cache(first)
        assert cache.get_seq_length() == ids.shape[1]
        second = model(input_ids=more, cache=cache)
        for b, p in enumerate(prompts):
            whole = model(input_ids=torch.cat([p, more[b:b + 1]], 1)).logits[0]
            n = p.shape[1]
            torch.testing.assert_close(first.logits[b, -n:], whole[:n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(second.logits[b], whole[n:], atol=1e-4, rtol=1e-4)
