"""Synthetic recall tasks, generated on the fly from a seed: MQAR and passkey retrieval (S-NIAH).

Both produce byte-level batches (vocabulary 256) as `TaskBatch(input_ids [B, T], targets [B, T])`,
where `targets[b, t]` is the token the model must predict at position t (what follows it) and IGNORE
everywhere that is not an answer. `hf_labels()` turns that into the Hugging Face `labels` convention
(shifted inside the model), so the loss falls on answer tokens only.

- MQAR (multi-query associative recall; Arora et al. 2023, "Zoology", arXiv 2312.04927): N key-value
  pairs `k1 v1 ... kN vN`, then a query region in which every key appears once, in random order, at a
  random even offset; the token after a query key must be its value. Keys and values come from disjoint
  ranges of the byte vocabulary; the gaps hold the filler token 0 (as in Zoology).
- Passkey retrieval (Mohtashami & Jaggi 2023; RULER's single needle S-NIAH, Hsieh et al. 2024,
  arXiv 2404.06654): filler (text from a corpus, or random lowercase letters) with a needle
  `<needle_prefix><digits><needle_suffix>` at a chosen depth, then the question; the digits that follow
  the question must repeat the needle's.

Every generator is a function of (settings, seed): the same seed gives the same batch on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
FILLER = 0


@dataclass
class TaskBatch:
    input_ids: torch.Tensor   # [B, T] long
    targets: torch.Tensor     # [B, T] long: the token to predict at position t, IGNORE where none

    def hf_labels(self) -> torch.Tensor:
        """Labels for MirascForCausalLM(labels=...): labels[t + 1] = targets[t] (the model shifts)."""
        labels = torch.full_like(self.targets, IGNORE)
        labels[:, 1:] = self.targets[:, :-1]
        return labels

    @property
    def n_answers(self) -> int:
        return int((self.targets != IGNORE).sum())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


def mix_seed(*parts: int) -> int:
    """One seed from several integers (e.g. a run's seed, a step, a setting), stable across machines."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFF_FFFF_FFFF_FFFF)) * 1099511628211) & 0xFFFF_FFFF_FFFF_FFFF
    return h & 0x7FFF_FFFF_FFFF_FFFF


# ------------------------------------------------------------------------------------------------ MQAR

@dataclass(frozen=True)
class MQARSpec:
    """Settings of MQAR. Keys in [key_lo, key_hi), values in [value_lo, value_hi): disjoint ranges of
    the 256 bytes (0 is the filler)."""

    key_lo: int = 1
    key_hi: int = 128
    value_lo: int = 128
    value_hi: int = 256

    def check(self, n_pairs: int, seq_len: int) -> None:
        if not (0 < self.key_lo < self.key_hi <= self.value_lo < self.value_hi <= 256):
            raise ValueError("MQAR needs 0 < key_lo < key_hi <= value_lo < value_hi <= 256")
        if n_pairs < 1 or n_pairs > self.key_hi - self.key_lo:
            raise ValueError(f"MQAR: {n_pairs} pairs need as many distinct keys "
                             f"({self.key_hi - self.key_lo} available)")
        if seq_len < 4 * n_pairs:
            raise ValueError(f"MQAR: {n_pairs} pairs need seq_len >= {4 * n_pairs} (pairs, then one query "
                             f"slot of two tokens per key), got {seq_len}")


def mqar_batch(batch: int, n_pairs: int, seq_len: int, seed: int, spec: MQARSpec = MQARSpec()) -> TaskBatch:
    """`batch` MQAR sequences of `seq_len` tokens with `n_pairs` pairs each (Zoology's layout)."""
    spec.check(n_pairs, seq_len)
    g = _gen(seed)
    nk = spec.key_hi - spec.key_lo
    keys = torch.argsort(torch.rand(batch, nk, generator=g), 1)[:, :n_pairs] + spec.key_lo   # distinct
    values = torch.randint(spec.value_lo, spec.value_hi, (batch, n_pairs), generator=g)
    ids = torch.full((batch, seq_len), FILLER, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    ctx = 2 * n_pairs
    ids[:, 0:ctx:2], ids[:, 1:ctx:2] = keys, values
    slots = (seq_len - ctx) // 2                        # query slots of two tokens: key, then filler
    slot = torch.argsort(torch.rand(batch, slots, generator=g), 1)[:, :n_pairs]   # distinct slots
    order = torch.argsort(torch.rand(batch, n_pairs, generator=g), 1)             # which key asks where
    pos = ctx + 2 * slot
    rows = torch.arange(batch)[:, None]
    ids[rows, pos] = keys.gather(1, order)
    targets[rows, pos] = values.gather(1, order)
    return TaskBatch(ids, targets)


# --------------------------------------------------------------------------------------------- passkey

@dataclass(frozen=True)
class PasskeySpec:
    """The needle and question around a number of `digits` decimal digits."""

    digits: int = 5
    needle_prefix: bytes = b" The passkey is "
    needle_suffix: bytes = b". "
    question: bytes = b" What is the passkey? The passkey is "

    @property
    def overhead(self) -> int:
        """Tokens that are not filler: needle, question and answer."""
        return len(self.needle_prefix) + self.digits + len(self.needle_suffix) + len(self.question) + self.digits


LETTERS = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz     "))   # random filler: letters and spaces


class Filler:
    """Where haystack text comes from: `source="random"` (lowercase letters and spaces) or a list of
    byte strings (e.g. corpus documents) from which windows are cut at random offsets."""

    def __init__(self, source: str | list[bytes] = "random"):
        if isinstance(source, str):
            if source != "random":
                raise ValueError(f"filler must be 'random' or a list of texts, got {source!r}")
            self.stream = None
        else:
            text = b"\n".join(source)
            if not text:
                raise ValueError("the filler texts are empty")
            self.stream = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()

    def take(self, n: int, g: torch.Generator) -> torch.Tensor:
        if n <= 0:
            return torch.zeros(0, dtype=torch.long)
        if self.stream is None:
            return LETTERS[torch.randint(0, len(LETTERS), (n,), generator=g)]
        total = self.stream.numel()
        if total >= n:
            start = int(torch.randint(0, total - n + 1, (1,), generator=g))
            return self.stream[start:start + n].clone()
        reps = -(-n // total)
        return self.stream.repeat(reps)[:n].clone()


def _bytes(b: bytes) -> torch.Tensor:
    return torch.tensor(list(b), dtype=torch.long)


def passkey_batch(batch: int, seq_len: int, seed: int, depth: float | None = None,
                  filler: Filler | None = None, spec: PasskeySpec = PasskeySpec()) -> TaskBatch:
    """`batch` haystacks of exactly `seq_len` tokens: filler, the needle after a share `depth` of the
    filler (None: a random depth per row), more filler, the question and the answer digits (targets)."""
    if seq_len < spec.overhead + 1:
        raise ValueError(f"passkey: seq_len must exceed the needle, question and answer "
                         f"({spec.overhead} tokens), got {seq_len}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    filler = filler or Filler()
    g = _gen(seed)
    n_fill = seq_len - spec.overhead
    ids = torch.empty(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    pre, suf, q = _bytes(spec.needle_prefix), _bytes(spec.needle_suffix), _bytes(spec.question)
    for b in range(batch):
        d = float(torch.rand(1, generator=g)) if depth is None else depth
        number = torch.randint(0, 10, (spec.digits,), generator=g) + ord("0")
        hay = filler.take(n_fill, g)
        cut = round(d * n_fill)
        row = torch.cat([hay[:cut], pre, number, suf, hay[cut:], q, number])
        ids[b] = row
        first = seq_len - spec.digits            # the first answer digit's position
        targets[b, first - 1:seq_len - 1] = number
    return TaskBatch(ids, targets)


# ------------------------------------------------------------------------------------------- scoring

def score(logits: torch.Tensor, batch: TaskBatch, per_sequence: bool = False) -> tuple[int, int]:
    """(correct, total) answers under argmax with teacher forcing. per_sequence: a sequence counts as
    correct only if all its answer tokens are (for a passkey this equals greedy decoding's exact match,
    since greedy decoding reproduces the teacher-forced inputs as long as every argmax is right)."""
    mask = batch.targets != IGNORE
    right = (logits.argmax(-1) == batch.targets) & mask
    if per_sequence:
        has = mask.any(1)
        ok = (right.sum(1) == mask.sum(1)) & has
        return int(ok.sum()), int(has.sum())
    return int(right.sum()), int(mask.sum())
