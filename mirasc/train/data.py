"""Training data: documents from a file, a folder or the Python standard library, tokenised (bytes by
default), split into train and validation by document, and packed into rows of `seq_len` tokens.

The batch of step s is a function of (seed, s) alone, so a resumed run reads exactly what an uninterrupted
one would, and every rank of a distributed run can build the same global batch and take its own rows.
"""
from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100
DEFAULT_CORPUS_BYTES = 4_000_000     # the embedded corpus: this many bytes of the standard library
_MAX_FILE_BYTES = 256_000            # larger standard-library files (generated tables) are skipped
_PIECE_BYTES = 16_384                # a single text file is cut into documents of about this size
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


@dataclass
class Document:
    name: str      # the path relative to the corpus root (plus ":<piece>" for pieces of one file)
    data: bytes


def _hash01(name: str, salt: str = "split") -> float:
    """A number in [0, 1) from a document's name: the same on every machine and Python. The salt keeps
    the validation split independent of the hash order that picks the default corpus."""
    return int.from_bytes(hashlib.sha1(f"{salt}:{name}".encode()).digest()[:8], "big") / 2 ** 64


def stdlib_documents(max_bytes: int = DEFAULT_CORPUS_BYTES) -> tuple[list[Document], str]:
    """The embedded default corpus: `*.py` files of this Python's standard library (tests and installed
    packages left out), taken in the order of a hash of their relative paths until `max_bytes`, so the
    subset is spread over the whole library and the same on every run of this Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if 0 < size <= _MAX_FILE_BYTES:
            files.append((rel.as_posix(), path))
    files.sort(key=lambda item: _hash01(item[0], "corpus"))
    docs, total = [], 0
    for rel, path in files:
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            continue
        docs.append(Document(rel, data))
        total += len(data)
    docs.sort(key=lambda d: d.name)
    return docs, f"python {sysconfig.get_python_version()} standard library ({root})"


def _pieces(name: str, data: bytes) -> list[Document]:
    """One file as documents of about _PIECE_BYTES, cut after a newline where there is one."""
    if len(data) <= _PIECE_BYTES:
        return [Document(name, data)]
    docs, start, i = [], 0, 0
    while start < len(data):
        end = min(start + _PIECE_BYTES, len(data))
        if end < len(data):
            cut = data.rfind(b"\n", start + _PIECE_BYTES // 2, end)
            end = cut + 1 if cut >= 0 else end
        docs.append(Document(f"{name}:{i}", data[start:end]))
        start, i = end, i + 1
    return docs


def load_documents(data: str | Path | None, max_bytes: int | None = None) -> tuple[list[Document], str]:
    """Documents of a folder (every file, recursively, one document each), of one file (cut into pieces,
    so that it can be split) or, with `data=None`, of the standard library. Sorted by name."""
    if data is None:
        return stdlib_documents(max_bytes or DEFAULT_CORPUS_BYTES)
    root = Path(data)
    if root.is_file():
        docs = _pieces(root.name, root.read_bytes())
    elif root.is_dir():
        docs = []
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                content = path.read_bytes()
                if content:
                    docs.append(Document(rel.as_posix(), content))
    else:
        raise FileNotFoundError(f"no such file or folder: {data}")
    if not docs:
        raise ValueError(f"{data}: no text found")
    if max_bytes:
        kept, total = [], 0
        for doc in docs:
            if total + len(doc.data) > max_bytes:
                break
            kept.append(doc)
            total += len(doc.data)
        docs = kept or docs[:1]
    return docs, str(root)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train and validation documents by a hash of each name; both sides get at least one document."""
    if len(docs) < 2:
        raise ValueError("the corpus needs at least two documents (one for training, one for validation)")
    val = [d for d in docs if _hash01(d.name) < val_fraction]
    train = [d for d in docs if _hash01(d.name) >= val_fraction]
    if not val:   # the document with the smallest hash moves over
        first = min(train, key=lambda d: _hash01(d.name))
        train.remove(first)
        val = [first]
    if not train:
        last = max(val, key=lambda d: _hash01(d.name))
        val.remove(last)
        train = [last]
    return train, val


def unigram_entropy(docs: list[Document]) -> float:
    """Entropy of the byte distribution, bits per byte: what a model that ignores context can reach."""
    counts = torch.zeros(256, dtype=torch.float64)
    for doc in docs:
        counts += torch.bincount(torch.frombuffer(bytearray(doc.data), dtype=torch.uint8).long(),
                                 minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


class ByteTokenizer:
    """Bytes as tokens: vocabulary 256, one token per byte."""

    vocab_size = 256

    def encode(self, data: bytes) -> torch.Tensor:
        """uint8 ids (the corpus stays in memory at one byte per token; batches widen them)."""
        if not data:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class FileTokenizer:
    """A local `tokenizers` tokenizer.json (nothing downloaded); text is read as UTF-8."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = str(path)
        self.tok = Tokenizer.from_file(self.path)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, data: bytes) -> torch.Tensor:
        ids = self.tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def make_tokenizer(path: str | Path | None):
    return ByteTokenizer() if path is None else FileTokenizer(path)


class PackedStream:
    """Documents tokenised and concatenated; rows of `seq_len` tokens are cut from the stream.

    For training (`shuffle=True`) every epoch concatenates the documents in its own order and reads the
    rows in its own order, both drawn from (seed, epoch): the row with global index i is row
    perm_e[i % R] of epoch e = i // R (R rows per epoch; the stream's tail that fills no whole row is
    dropped), so the rows of one batch come from all over the corpus, not from one or two documents.
    Validation reads the documents in name order and the rows in order.
    """

    def __init__(self, docs: list[Document], tokenizer, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.tokens = [tokenizer.encode(d.data) for d in docs]
        keep = [i for i, t in enumerate(self.tokens) if t.numel() > 0]
        self.tokens = [self.tokens[i] for i in keep]
        self.n_bytes = sum(len(docs[i].data) for i in keep)
        self.n_tokens = sum(t.numel() for t in self.tokens)
        if self.n_tokens < seq_len:
            raise ValueError(f"{self.n_tokens} tokens cannot fill one row of {seq_len}")
        self.rows_per_epoch = self.n_tokens // seq_len
        self._epoch: int | None = None

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / self.n_tokens

    def _build(self, epoch: int) -> None:
        """The epoch's stream and, per token, whether it starts a document."""
        if self._epoch == epoch:
            return
        order = list(range(len(self.tokens)))
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(order), generator=gen).tolist()
        self._stream = torch.cat([self.tokens[i] for i in order])
        starts = torch.zeros(self._stream.numel(), dtype=torch.bool)
        lengths = torch.tensor([self.tokens[i].numel() for i in order])
        starts[torch.cumsum(lengths, 0)[:-1]] = True
        starts[0] = True
        self._starts = starts
        self._rows = torch.randperm(self.rows_per_epoch, generator=gen) if self.shuffle else None
        self._epoch = epoch

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [seq_len], document-start flags [seq_len]) of the row with this global index."""
        epoch, r = divmod(index, self.rows_per_epoch)
        self._build(epoch if self.shuffle else 0)
        if self._rows is not None:
            r = int(self._rows[r])
        span = slice(r * self.seq_len, (r + 1) * self.seq_len)
        return self._stream[span], self._starts[span]


@dataclass
class Batch:
    input_ids: torch.Tensor    # [1, rows * seq_len]
    labels: torch.Tensor       # [1, rows * seq_len]; IGNORE at every segment start
    cu_seqlens: torch.Tensor   # int32 [segments + 1]: document and row boundaries

    @property
    def n_targets(self) -> int:
        """Tokens the loss predicts (after the model's shift by one)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.cu_seqlens.to(device, non_blocking=True))


def pack_rows(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    """Rows flattened into one packed sequence. A segment starts at every document start and every row
    start (each starts from a fresh memory); the first token of a segment has no label, so no token is
    predicted from another document or another row."""
    tokens = torch.cat([t for t, _ in rows]).long()
    starts = torch.cat([s for _, s in rows]).clone()
    L = rows[0][0].numel()
    starts[::L] = True
    offsets = torch.nonzero(starts).flatten()
    cu = torch.cat([offsets, torch.tensor([tokens.numel()])]).to(torch.int32)
    labels = tokens.clone()
    labels[starts] = IGNORE
    return Batch(tokens.unsqueeze(0), labels.unsqueeze(0), cu)


class TrainData:
    """The global batch of every step, and each rank's share of it.

    Step s (counted from 0) reads rows r(s) ... r(s) + G - 1 of the training stream, G = the global batch
    in rows and r(s) = s * G. A resumed run whose global batch was changed continues from the row where
    the checkpoint stopped: r(s) = row0 + (s - step0) * G. A micro-batch of one rank is a contiguous slice
    of those rows, so N ranks with per-rank batch B read together what one process with batch N * B reads.
    """

    def __init__(self, stream: PackedStream, global_rows: int, step0: int = 0, row0: int = 0):
        self.stream, self.global_rows, self.step0, self.row0 = stream, global_rows, step0, row0

    def first_row(self, step: int) -> int:
        return self.row0 + (step - self.step0) * self.global_rows

    def rows(self, step: int, start: int, count: int) -> Batch:
        base = self.first_row(step)
        return pack_rows([self.stream.row(base + start + j) for j in range(count)])

    def global_targets(self, step: int) -> int:
        """Predicted tokens in the whole global batch of a step (the loss divides by this)."""
        return self.rows(step, 0, self.global_rows).n_targets

    def epoch(self, step: int) -> float:
        return self.first_row(step) / self.stream.rows_per_epoch


def validation_batches(stream: PackedStream, rows_per_batch: int, total_rows: int, rank: int = 0,
                       world: int = 1) -> list[Batch | None]:
    """This rank's validation batches: the first `total_rows` rows of the validation stream (fewer when
    it is short), dealt out rows_per_batch at a time to the ranks in turn; the rows evaluated depend only
    on total_rows, not on how many processes share them. Every rank gets the same number of entries
    (collectives must match); entries past the end are None."""
    total = min(stream.rows_per_epoch, total_rows)
    n_batches = math.ceil(total / (rows_per_batch * world))
    out = []
    for b in range(n_batches):
        first = (b * world + rank) * rows_per_batch
        idx = [i for i in range(first, first + rows_per_batch) if i < total]
        out.append(pack_rows([stream.row(i) for i in idx]) if idx else None)
    return out
