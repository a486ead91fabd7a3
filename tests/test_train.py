"""mirasc train: data split and packing, exact resume, 2 processes (gloo) equal 1, run outputs, learning."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mirasc.train.data import (
    IGNORE,
    ByteTokenizer,
    Document,
    PackedStream,
    TrainData,
    load_documents,
    pack_rows,
    split_documents,
    unigram_entropy,
)

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "retnet.miras"
# a tiny model that still learns: RetNet (chunk 64, no per-token loop), one layer of width 32, on the
# torch backend (conftest sets TRITON_INTERPRET=1 without a GPU, which would run the kernels interpreted)
TINY = {"preset": "tiny", "d_model": 32, "layers": 1, "heads": 2, "head_dim": 16, "seq_len": 64,
        "progress": False, "threads": 1, "backend": "torch"}

_WORDS = ["the", "memory", "retention", "bias", "gate", "chunk", "state", "update", "key", "value", "query",
          "layer", "token", "decay", "rule", "learning", "rate", "momentum", "gradient", "attention"]


def _corpus(folder: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """Documents of seeded random sentences over a small vocabulary (learnable within a few steps)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                 for _ in range(rng.randint(10, 40))]
        (folder / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


# ------------------------------------------------------------------------------------------------ data

def test_split_is_deterministic_disjoint_and_complete(corpus):
    docs, _ = load_documents(corpus)
    train_a, val_a = split_documents(docs, 0.2)
    train_b, val_b = split_documents(list(reversed(load_documents(corpus)[0])), 0.2)
    assert sorted(d.name for d in train_a) == sorted(d.name for d in train_b)
    assert sorted(d.name for d in val_a) == sorted(d.name for d in val_b)
    assert val_a and train_a
    assert not {d.name for d in train_a} & {d.name for d in val_a}
    assert len(train_a) + len(val_a) == len(docs) == 24
    # a document's side depends on its name only: removing others does not move it
    train_c, _ = split_documents([d for d in docs if d.name != train_a[0].name], 0.2)
    assert {d.name for d in train_c} == {d.name for d in train_a} - {train_a[0].name}


def test_default_corpus_is_the_standard_library_deterministically():
    a, source = load_documents(None, 200_000)
    b, _ = load_documents(None, 200_000)
    assert "standard library" in source
    assert [d.name for d in a] == [d.name for d in b] and a[0].data == b[0].data
    assert all(d.name.endswith(".py") for d in a)
    assert 100_000 < sum(len(d.data) for d in a) <= 200_000


def test_one_file_is_cut_into_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"".join(b"line %d of the book\n" % i for i in range(5000)))
    docs, _ = load_documents(path)
    assert len(docs) > 2
    assert b"".join(d.data for d in docs) == path.read_bytes()
    assert all(d.data.endswith(b"\n") for d in docs)


def test_unigram_entropy():
    assert unigram_entropy([Document("a", b"abababab")]) == pytest.approx(1.0)
    assert unigram_entropy([Document("a", bytes(range(256)))]) == pytest.approx(8.0)


def test_packing_marks_documents_and_rows():
    docs = [Document(f"d{i}", bytes([65 + i]) * n) for i, n in enumerate([5, 11, 3, 9, 20])]  # 48 bytes
    stream = PackedStream(docs, ByteTokenizer(), seq_len=8, seed=0, shuffle=False)
    assert stream.rows_per_epoch == 6
    batch = pack_rows([stream.row(i) for i in range(3)])   # rows 0-2: tokens 0..23
    ids = batch.input_ids[0]
    assert ids.tolist() == list(b"A" * 5 + b"B" * 11 + b"C" * 3 + b"D" * 5)
    # segments start at every document start (0, 5, 16, 19) and every row start (0, 8, 16)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 5, 8, 16, 19, 24]
    starts = batch.cu_seqlens[:-1].long()
    assert (batch.labels[0, starts] == IGNORE).all()
    rest = torch.ones(24, dtype=torch.bool)
    rest[starts] = False
    assert torch.equal(batch.labels[0, rest], ids[rest])
    # no predicted token comes after a token of another document
    for t in range(1, 24):
        if batch.labels[0, t] != IGNORE:
            assert ids[t] == ids[t - 1]
    assert batch.n_targets == 24 - 5


def test_tokenizer_file(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mirasc.train.data import make_tokenizer

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(p) for p in sorted(corpus.iterdir())], trainers.BpeTrainer(vocab_size=120,
                                                                              special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.vocab_size == tok.get_vocab_size()
    docs, _ = load_documents(corpus)
    stream = PackedStream(docs, tokenizer, seq_len=16, shuffle=False)
    assert stream.n_bytes == sum(len(d.data) for d in docs)
    assert stream.bytes_per_token > 1.5          # merged words: fewer tokens than bytes
    tokens, _ = stream.row(0)
    assert int(tokens.max()) < tokenizer.vocab_size
    assert tokens.tolist() == tok.encode(docs[0].data.decode()).ids[:16]


def test_data_order_follows_seed_and_step_and_ranks_split_the_global_batch():
    docs = [Document(f"d{i}", bytes([i]) * (10 + i)) for i in range(30)]
    a = TrainData(PackedStream(docs, ByteTokenizer(), 16, seed=3), global_rows=4)
    b = TrainData(PackedStream(docs, ByteTokenizer(), 16, seed=3), global_rows=4)
    c = TrainData(PackedStream(docs, ByteTokenizer(), 16, seed=4), global_rows=4)
    epochs = [a.rows(s, 0, 4).input_ids for s in range(60)]     # past the first epoch (34 rows)
    assert all(torch.equal(x, b.rows(s, 0, 4).input_ids) for s, x in enumerate(epochs))
    assert not all(torch.equal(x, c.rows(s, 0, 4).input_ids) for s, x in enumerate(epochs))
    for step in (0, 9, 40):
        whole = a.rows(step, 0, 4)
        halves = [a.rows(step, 0, 2), a.rows(step, 2, 2)]
        assert torch.equal(torch.cat([h.input_ids for h in halves], 1), whole.input_ids)
        assert torch.equal(torch.cat([h.labels for h in halves], 1), whole.labels)
        assert sum(h.n_targets for h in halves) == whole.n_targets == a.global_targets(step)
    # a resumed run with another global batch continues from the checkpoint's row
    resumed = TrainData(a.stream, global_rows=8, step0=10, row0=a.first_row(10))
    assert torch.equal(resumed.rows(10, 0, 4).input_ids, a.rows(10, 0, 4).input_ids)
    assert torch.equal(resumed.rows(11, 0, 8).input_ids[:, :4 * 16], a.rows(12, 0, 4).input_ids)
    assert torch.equal(resumed.rows(11, 0, 8).input_ids[:, 4 * 16:], a.rows(13, 0, 4).input_ids)


# ------------------------------------------------------------------------------------------- training

def test_run_folder_checkpoint_and_curves(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    import mirasc.lm  # registers the model with the Auto classes
    from mirasc.train import train
    from mirasc.train.data import validation_batches
    from mirasc.train.trainer import Dist, evaluate

    run = train(SPEC, **TINY, data=str(corpus), steps=6, eval_every=3, batch_size=2, val_fraction=0.2,
                out=str(tmp_path / "run"))
    rows = _metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_bpb" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val_rows] == [0, 3, 6]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(train_rows[0])
    assert train_rows[-1]["tokens"] == 6 * 2 * 64
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"config.json", "model.safetensors", "trainer_state.pt", "train_config.json",
            "summary.json"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_bpb"] == val_rows[-1]["val_bpb"]

    # the saved model, loaded by transformers, scores the validation set as the trainer did
    model = AutoModelForCausalLM.from_pretrained(run)
    docs, _ = load_documents(corpus)
    _, val_docs = split_documents(docs, 0.2)
    val_stream = PackedStream(val_docs, ByteTokenizer(), 64, shuffle=False)
    cfg = mirasc.train.make_config(SPEC, **TINY)
    loss, bpb = evaluate(model, validation_batches(val_stream, 2, 2 * cfg.eval_batches), torch.device("cpu"),
                         cfg, Dist(), val_stream.bytes_per_token)
    assert loss == pytest.approx(val_rows[-1]["val_loss"], rel=1e-5)
    assert bpb == pytest.approx(val_rows[-1]["val_bpb"], rel=1e-5)


def test_resume_continues_exactly(corpus, tmp_path):
    from mirasc.train import train

    opts = {**TINY, "data": str(corpus), "steps": 8, "batch_size": 2, "eval_every": 4, "save_every": 4,
            "keep_checkpoints": 0}
    whole = train(SPEC, **opts, out=str(tmp_path / "whole"))
    assert (whole / "checkpoint-4" / "trainer_state.pt").exists()
    resumed = train(resume=whole / "checkpoint-4", out=str(tmp_path / "resumed"))
    a, b = _metrics(whole), _metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    wa, wb = _weights(whole), _weights(resumed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a finished run goes on in its own folder from its final state, with more steps
    assert train(resume=whole, steps=10) == whole
    assert [r["step"] for r in _metrics(whole) if "loss" in r] == list(range(1, 11))
    assert json.loads((whole / "checkpoint.json").read_text())["step"] == 10


def test_loss_falls(corpus, tmp_path):
    from mirasc.train import train

    run = train(SPEC, **TINY, data=str(corpus), steps=30, batch_size=4, lr=1e-2, eval_every=0,
                out=str(tmp_path / "run"))
    losses = [r["loss"] for r in _metrics(run) if "loss" in r]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_bpb"] < summary["unigram_entropy"]


# ---------------------------------------------------------------------------------------- distributed

def _torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mirasc", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _cli_args(corpus: Path, out: Path, **extra) -> list[str]:
    opts = {**TINY, "data": str(corpus), "steps": 6, "eval_every": 3, "save_every": 3, "out": str(out),
            "keep_checkpoints": 0, **extra}
    args = [str(SPEC)]
    for key, value in opts.items():
        if key == "progress":
            args.append("--no-progress")
        elif value == "":
            args.append(f"--{key}")
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory) -> Path:
    """6 steps in 2 processes (DDP over gloo), batch 2 per process, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = _torchrun(2, _cli_args(corpus, out, batch_size=2), out.parent)
    assert "2 processes on cpu, DDP" in proc.stdout
    return out


def _same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (key, ra, rb)


def test_two_processes_equal_one_and_resume_on_one(corpus, ddp_run, tmp_path):
    from mirasc.train import train

    # one process reads the same global batch of 4 rows as 2 micro-batches of 2 (gradient accumulation)
    one = train(SPEC, **TINY, data=str(corpus), steps=6, eval_every=3, save_every=3, batch_size=2,
                grad_accum=2, out=str(tmp_path / "one"))
    _same_curve(_metrics(ddp_run), _metrics(one))
    wa, wb = _weights(ddp_run), _weights(one)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    # the 2-process checkpoint resumes in one process (batch 2 x 2 processes -> one batch of 4)
    resumed = train(resume=ddp_run / "checkpoint-3", out=str(tmp_path / "resumed"))
    assert json.loads((resumed / "train_config.json").read_text())["batch_size"] == 4
    _same_curve(_metrics(ddp_run), _metrics(resumed))


def test_fsdp_equals_ddp_and_resumes_on_one(corpus, ddp_run, tmp_path):
    from mirasc.train import train

    fsdp = tmp_path / "fsdp"
    proc = _torchrun(2, _cli_args(corpus, fsdp, batch_size=2, fsdp=""), tmp_path)
    assert "FSDP2" in proc.stdout
    _same_curve(_metrics(ddp_run), _metrics(fsdp))
    wa, wb = _weights(ddp_run), _weights(fsdp)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    resumed = train(resume=fsdp / "checkpoint-3", out=str(tmp_path / "resumed"))
    _same_curve(_metrics(fsdp), _metrics(resumed))


def test_the_run_says_which_backend_its_memory_layers_take(tmp_path):
    """On CUDA a layer with fused kernels says so, Memora that its read-out runs in Triton; one without
    (kl over the value axis on an MLP memory) names the torch backend and the reason; on the CPU the
    torch backend."""
    from mirasc.train.trainer import make_config, memory_backend_line

    root = ROOT / "examples"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory_backend_line(make_config(root / "gated_deltanet.miras"), cuda).endswith(
        "fused Triton kernels (matrix memory)")
    assert memory_backend_line(make_config(root / "titans.miras"), cuda).endswith("(MLP memory)")
    memora = memory_backend_line(make_config(root / "memora.miras"), cuda)
    assert memora.endswith("the torch backend with every token's read-out through the map in Triton kernels")
    value_axis = tmp_path / "memora_value.miras"
    value_axis.write_text((root / "memora.miras").read_text().replace("kl(axis=key)", "kl(axis=value)"))
    line = memory_backend_line(make_config(value_axis), cuda)
    assert "the torch backend" in line and "no triton kernel for MLP memories" in line
    assert "the torch backend" in memory_backend_line(make_config(root / "titans.miras"), cpu)
    assert "'reference'" in memory_backend_line(make_config(root / "titans.miras", backend="reference"), cuda)
