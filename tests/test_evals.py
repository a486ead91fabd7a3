"""mirasc.evals: task generators, oracle and random scorers, bpb by position, compare's report and
resume, the eval CLI, and the lm_eval model."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import itertools

from mirasc.evals import tasks
from mirasc.evals.tasks import IGNORE, Filler, MQARSpec, PasskeySpec, mqar_batch, passkey_batch, score

ROOT = Path(__file__).resolve().parent.parent
RETNET = str(ROOT / "examples" / "retnet.miras")
GDN = str(ROOT / "examples" / "gated_deltanet.miras")
TINY = {"d_model": 16, "layers": 1, "heads": 2, "head_dim": 8, "batch_size": 4, "threads": 1, "backend": "torch"}


def _mqar_oracle_logits(batch: tasks.TaskBatch, spec: MQARSpec) -> torch.Tensor:
    """A "model" that looks every queried key up in the pairs at the start of its own sequence."""
    B, T = batch.input_ids.shape
    logits = torch.zeros(B, T, 256)
    for b in range(B):
        ids = batch.input_ids[b].tolist()
        table = {}
        for t in range(0, T - 1, 2):
            if spec.key_lo <= ids[t] < spec.key_hi and spec.value_lo <= ids[t + 1] < spec.value_hi:
                table.setdefault(ids[t], ids[t + 1])   # the first binding: the context's
            else:
                break
        for t in range(T):
            if ids[t] in table:
                logits[b, t, table[ids[t]]] = 1.0
    return logits


def _passkey_oracle_logits(batch: tasks.TaskBatch, spec: PasskeySpec) -> torch.Tensor:
    """Finds the needle's digits in the sequence and predicts them after the question."""
    B, T = batch.input_ids.shape
    logits = torch.zeros(B, T, 256)
    pre = spec.needle_prefix
    for b in range(B):
        data = bytes(batch.input_ids[b].tolist())
        start = data.index(pre) + len(pre)
        digits = data[start:start + spec.digits]
        q = data.rindex(spec.question) + len(spec.question)
        for i, d in enumerate(digits):
            logits[b, q - 1 + i, d] = 1.0
    return logits


def test_mqar_is_seeded_and_well_formed():
    spec = MQARSpec()
    a, b, c = mqar_batch(8, 6, 48, seed=3), mqar_batch(8, 6, 48, seed=3), mqar_batch(8, 6, 48, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)
    ids, tg = a.input_ids, a.targets
    keys, values = ids[:, 0:12:2], ids[:, 1:12:2]
    assert ((keys >= spec.key_lo) & (keys < spec.key_hi)).all()
    assert ((values >= spec.value_lo) & (values < spec.value_hi)).all()
    assert all(len(set(row.tolist())) == 6 for row in keys)         # distinct keys
    assert (a.targets != IGNORE).sum(1).eq(6).all()                  # every key queried once
    for r in range(8):
        q = (tg[r] != IGNORE).nonzero().flatten()
        assert sorted(ids[r, q].tolist()) == sorted(keys[r].tolist())
        assert ((q - 12) % 2 == 0).all() and (q >= 12).all()
        mapping = dict(zip(keys[r].tolist(), values[r].tolist()))
        assert [mapping[k] for k in ids[r, q].tolist()] == tg[r, q].tolist()
    labels = a.hf_labels()
    assert torch.equal(labels[:, 1:], a.targets[:, :-1]) and (labels[:, 0] == IGNORE).all()
    with pytest.raises(ValueError):
        mqar_batch(2, 20, 64, 0)


def test_oracle_scores_all_and_random_scores_chance():
    spec = MQARSpec()
    batch = mqar_batch(64, 8, 64, seed=1)
    assert score(_mqar_oracle_logits(batch, spec), batch) == (512, 512)
    right, total = score(torch.randn(64, 64, 256, generator=torch.Generator().manual_seed(0)), batch)
    # a random guess over 256 tokens: ~1/256 (the values alone span 128)
    assert right / total < 0.03
    pk = PasskeySpec()
    pb = passkey_batch(16, 200, seed=2, filler=Filler([b"some corpus text 12 with digits\n" * 10]))
    assert score(_passkey_oracle_logits(pb, pk), pb, per_sequence=True) == (16, 16)
    assert score(torch.randn(16, 200, 256), pb, per_sequence=True)[0] == 0


def test_passkey_depth_length_and_seed():
    spec = PasskeySpec(digits=4)
    for depth in (0.0, 0.5, 1.0):
        b = passkey_batch(3, 150, seed=7, depth=depth, spec=spec)
        assert b.input_ids.shape == (3, 150)
        for r in range(3):
            data = bytes(b.input_ids[r].tolist())
            at = data.index(spec.needle_prefix)
            n_fill = 150 - spec.overhead
            assert at == round(depth * n_fill)
            digits = data[at + len(spec.needle_prefix):][:4]
            assert data.endswith(spec.question + digits)
            assert bytes(b.targets[r][b.targets[r] != IGNORE].tolist()) == digits
    assert torch.equal(passkey_batch(2, 90, 5).input_ids, passkey_batch(2, 90, 5).input_ids)
    assert not torch.equal(passkey_batch(2, 90, 5).input_ids, passkey_batch(2, 90, 6).input_ids)
    with pytest.raises(ValueError):
        passkey_batch(1, 40, 0)


def _tiny_lm_run(tmp_path: Path) -> Path:
    """A `mirasc train` run of a few steps on a small local corpus."""
    from mirasc.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        words = [b"alpha", b"beta", b"gamma", b"delta", b"x = 1\n", b"def f():\n"]
        idx = torch.randint(0, len(words), (300,), generator=gen).tolist()
        (corpus / f"doc{i}.txt").write_bytes(b" ".join(words[j] for j in idx))
    return train(RETNET, preset="tiny", steps=3, data=str(corpus), out=str(tmp_path / "run"), progress=False,
                 eval_every=0, seq_len=32, val_fraction=0.3, backend="torch")


def test_bpb_by_position_matches_a_hand_calculation(tmp_path):
    from mirasc.evals import lm_eval
    from mirasc.train.data import pack_rows

    run = _tiny_lm_run(tmp_path)
    model = lm_eval.load_run_model(run, device="cpu")
    _, cfg = lm_eval.run_files(run)
    rows, bpt = lm_eval.validation_rows(cfg, 32, max_rows=3)
    assert bpt == 1.0
    # by hand: every document segment of every row through the model on its own, token by token
    per_bucket: dict[int, list[float]] = {}
    all_nats = []
    for row in rows:
        batch = pack_rows([row])
        cu = batch.cu_seqlens.tolist()
        for a, b in itertools.pairwise(cu):
            seg = batch.input_ids[:, a:b]
            if seg.shape[1] < 2:
                continue
            logp = torch.log_softmax(model(input_ids=seg).logits[0].double(), -1)
            for p in range(1, seg.shape[1]):
                nat = -float(logp[p - 1, seg[0, p]].detach())
                all_nats.append(nat)
                per_bucket.setdefault(int(math.log2(p)), []).append(nat)
    result = lm_eval.bpb_by_position(run, 32, max_rows=3, model=model)
    assert result["bpb"] == pytest.approx(sum(all_nats) / len(all_nats) / math.log(2), rel=1e-4)
    buckets = {int(math.log2(b["lo"])): b for b in result["buckets"]}
    assert set(buckets) == set(per_bucket)
    for k, nats in per_bucket.items():
        assert buckets[k]["tokens"] == len(nats)
        assert buckets[k]["bpb"] == pytest.approx(sum(nats) / len(nats) / math.log(2), rel=1e-4)
    assert [(b["lo"], b["hi"]) for b in result["buckets"]][:3] == [(1, 2), (2, 4), (4, 8)]
    # the trainer's own validation number on the same rows agrees
    assert lm_eval.bpb(run, 32, max_rows=3, model=model)["bpb"] == pytest.approx(result["bpb"], rel=1e-6)
    # RetNet's dot-product bias computes the same function at every chunk size
    chunks = lm_eval.chunk_consistency(run, [1, 8], 32, max_rows=2)
    assert chunks["train_chunk"] == 64
    assert all(abs(r["delta"]) < 1e-4 for r in chunks["results"])


def test_compare_writes_report_and_resumes(tmp_path, monkeypatch):
    from mirasc.evals import compare as compare_mod
    from mirasc.evals import task_train

    out = tmp_path / "report"
    settings = dict(TINY, steps=2, train_len=32, train_pairs=4, eval_lens=[32], eval_pairs=[2, 4],
                    eval_samples=4)
    compare_mod.compare([GDN, RETNET], task="mqar", out=out, progress=False, **settings)
    report = (out / "report.md").read_text()
    for name in ("gated_deltanet", "retnet", "attention"):
        assert f"| {name} |" in report
        result = json.loads((out / "results" / f"{name}.json").read_text())
        assert set(result["accuracy"]) == {"T=32 N=2", "T=32 N=4"}
        assert result["steps"] == 2 and result["n_params"] > 0
        assert (out / "runs" / name / "config.json").exists()
    for png in ("loss.png", "mqar_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    params = {n: json.loads((out / "results" / f"{n}.json").read_text())["n_params"]
              for n in ("gated_deltanet", "retnet", "attention")}
    assert len(set(params.values())) == 3     # unequal sizes are reported as they are
    # the same data order for every model: the batch of a step depends on (seed, step) only
    cfg = task_train.TaskConfig(**settings).resolved()
    assert torch.equal(task_train.train_batch(cfg, 1).input_ids, task_train.train_batch(cfg, 1).input_ids)

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    calls = []
    monkeypatch.setattr(compare_mod, "train_task", lambda *a, **k: calls.append(a) or pytest.fail("retrained"))
    compare_mod.compare([GDN, RETNET], task="mqar", out=out, progress=False, **settings)
    assert calls == []
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == stamps
    # an interrupted comparison: one result missing is the only model trained again
    (out / "results" / "retnet.json").unlink()
    monkeypatch.setattr(compare_mod, "train_task", lambda spec, task, **k: calls.append(spec) or
                        task_train.train_task(spec, task, **k))
    compare_mod.compare([GDN, RETNET], task="mqar", out=out, progress=False, **settings)
    assert calls == [RETNET]


def test_passkey_task_trains_and_plots(tmp_path):
    from mirasc.evals.compare import compare

    out = compare([RETNET], task="passkey", out=tmp_path / "pk", progress=False,
                  **dict(TINY, steps=2, train_len=80, eval_lens=[80, 160], eval_depths=[0.0, 1.0], eval_samples=2,
                         digits=3))
    result = json.loads((out / "results" / "retnet.json").read_text())
    assert set(result["accuracy"]) == {"T=80 depth=0", "T=80 depth=1", "T=160 depth=0", "T=160 depth=1"}
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "T=160" in (out / "report.md").read_text()


def test_eval_cli(tmp_path, capsys):
    from mirasc.cli import main
    from mirasc.evals.task_train import train_task

    run = _tiny_lm_run(tmp_path)
    assert main(["eval", str(run), "--task", "positions", "--rows", "2", "--json", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    assert "bits per byte" in text and "1-1" in text
    assert json.loads((tmp_path / "p.json").read_text())["buckets"]
    assert main(["eval", str(run), "--task", "chunks", "--chunks", "1", "--rows", "2"]) == 0
    assert "trained with chunk 64" in capsys.readouterr().out
    task_run = tmp_path / "task"
    train_task(RETNET, "mqar", out=task_run, progress=False, **dict(TINY, steps=1, train_len=32, train_pairs=2,
                                                                    eval_lens=[32], eval_pairs=[2], eval_samples=2))
    assert main(["eval", str(task_run), "--task", "mqar", "--pairs", "1,2", "--samples", "3"]) == 0
    out = capsys.readouterr().out
    assert "T=32 N=1" in out and "T=32 N=2" in out
    with pytest.raises(SystemExit, match="no such folder"):
        main(["eval", str(tmp_path / "missing"), "--task", "bpb"])


def test_lm_eval_harness_model(tmp_path):
    """lm_eval's model "mirasc" on a tiny saved model with local tasks: every metric equals the same
    quantity computed directly from the model."""
    lm_eval = pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    import mirasc.evals.harness  # noqa: F401  (registers "mirasc")
    from mirasc.lm import MirascConfig, MirascForCausalLM

    torch.manual_seed(0)
    model = MirascForCausalLM(MirascConfig(spec=Path(RETNET).read_text(), spec_file="retnet.miras", hidden_size=16,
                                           num_hidden_layers=1, heads=2, head_dim=8)).eval()
    model.save_pretrained(tmp_path / "model")
    docs = [{"q": "2+2=", "choices": ["4", "5", "22"], "answer": 0, "text": "hello world", "target": "ab"},
            {"q": "sky is", "choices": [" blue", " green"], "answer": 1, "text": "def f(x): return x",
             "target": "c"}]
    (tmp_path / "data.json").write_text("\n".join(json.dumps(d) for d in docs))
    tdir = tmp_path / "tasks"
    tdir.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.json'}\n"
              "test_split: test\n")
    (tdir / "mc.yaml").write_text("task: mirasc_t_mc\n" + common + "output_type: multiple_choice\n"
                                  "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                                  "metric_list:\n  - metric: acc\n")
    (tdir / "ppl.yaml").write_text("task: mirasc_t_ppl\n" + common + "output_type: loglikelihood_rolling\n"
                                   "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                                   "  - metric: bits_per_byte\n")
    (tdir / "gen.yaml").write_text("task: mirasc_t_gen\n" + common + "output_type: generate_until\n"
                                   "doc_to_text: '{{q}}'\ndoc_to_target: '{{target}}'\n"
                                   "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 3\n"
                                   "metric_list:\n  - metric: exact_match\n")
    full = lm_eval.simple_evaluate(model="mirasc", model_args=f"pretrained={tmp_path / 'model'}",
                                   tasks=["mirasc_t_mc", "mirasc_t_ppl", "mirasc_t_gen"], log_samples=True,
                                   task_manager=TaskManager(include_path=str(tdir)))
    res = full["results"]

    def logprob(context: bytes, cont: bytes) -> float:
        ids = torch.tensor([list(context + cont)])
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        return sum(float(lp[len(context) - 1 + i, c]) for i, c in enumerate(cont))

    # lm_eval puts its target_delimiter, a space, between the context and each choice
    acc = sum(max(range(len(d["choices"])), key=lambda i: logprob(d["q"].encode(), b" " + d["choices"][i].encode()))
              == d["answer"] for d in docs) / len(docs)
    assert res["mirasc_t_mc"]["acc,none"] == pytest.approx(acc)
    nll = -sum(logprob(b"\n", d["text"].encode()) for d in docs)
    bpb = nll / math.log(2) / sum(len(d["text"].encode()) for d in docs)
    assert res["mirasc_t_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)

    def greedy(prompt: bytes, n: int) -> bytes:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return bytes(ids[len(prompt):])

    samples = sorted(full["samples"]["mirasc_t_gen"], key=lambda x: x["doc_id"])
    for sample, d in zip(samples, docs):
        # greedy bytes up to the stop string "\n" (here never reached within 3 bytes, or cut at it)
        expected = greedy(d["q"].encode(), 3).decode("utf-8", "replace").split("\n")[0]
        assert sample["resps"][0][0] == expected
    em = sum(greedy(d["q"].encode(), 3).decode("utf-8", "replace").split("\n")[0] == d["target"]
             for d in docs) / len(docs)
    assert res["mirasc_t_gen"]["exact_match,none"] == pytest.approx(em)
