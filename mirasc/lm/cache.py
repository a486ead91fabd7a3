"""MirascCache: the decoding state of a MirascForCausalLM, as the installed transformers' generate() expects.

A Miras layer's state is a LayerState (the convolution tail and a DecodeState) whose `pos` -- tokens
consumed in the current chunk -- is one Python int for the whole batch. Rows of a batch of prompts with
different lengths therefore cannot share one state: the cache keeps the rows in groups whose `pos` agree
(rows with equal prompt length modulo the chunk size) and every memory layer holds one LayerState per
group. Every decoding step adds one token to every row, so a group stays in step forever.

Attention layers keep keys (RoPE applied) and values [B, heads, S, head_dim], right aligned: a row's real
tokens are its last columns and `valid` [B, S] marks them; with a sliding window only the last
`window` columns are kept. `lengths` [B] counts each row's real tokens (the next RoPE position).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache


def tree_cat(states: list) -> Any:
    """Concatenate block states (NamedTuples / tuples of tensors, ints, None) along the batch dim 0.

    Ints (a DecodeState's `pos`) must agree: they are one value for the whole batch.
    """
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, 0)
    if first is None:
        if any(s is not None for s in states):
            raise ValueError("cannot join a missing state with a present one")
        return None
    if isinstance(first, int):
        if any(s != first for s in states):
            raise ValueError(f"cannot join states at different positions {states}")
        return first
    if isinstance(first, tuple):
        parts = [tree_cat(list(xs)) for xs in zip(*states)]
        return type(first)(*parts) if hasattr(first, "_fields") else tuple(parts)
    raise TypeError(f"unexpected state leaf {type(first).__name__}")


def tree_index(state: Any, rows: torch.Tensor) -> Any:
    """The rows `rows` (a LongTensor) of a block state along the batch dim 0."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, rows.to(state.device))
    if state is None or isinstance(state, int):
        return state
    if isinstance(state, tuple):
        parts = [tree_index(x, rows) for x in state]
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    raise TypeError(f"unexpected state leaf {type(state).__name__}")


def memory_pos(state: Any) -> int:
    """The chunk position of a block's LayerState (its DecodeState's `pos`)."""
    return state.memory.pos


class MirascCache(Cache):
    """Per-row recurrent and attention state of a MirascForCausalLM during generation.

    Built by the model's first forward with use_cache=True (the prefill) and updated in place by every
    later forward that receives it. `groups` lists the batch rows of each group (LongTensors);
    `memory[i]` holds layer i's LayerState per group; `keys[i]`, `values[i]` are attention layer i's.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, mixer_types: list[str], window: int | None = None):
        super().__init__(layers=[])
        self.mixer_types = list(mixer_types)
        self.window = window
        self.groups: list[torch.Tensor] = []
        self.memory: dict[int, list] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.seen = 0  # input columns consumed (padding included): what generate() slices input_ids by

    def __repr__(self) -> str:
        return (f"MirascCache(rows={self.batch_size}, groups={len(self.groups)}, seen={self.seen}, "
                f"mixers={self.mixer_types})")

    def __len__(self) -> int:
        return len(self.mixer_types)

    @property
    def is_initialized(self) -> bool:
        return self.lengths is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.lengths is None else int(self.lengths.shape[0])

    @property
    def is_sliding(self) -> list[bool]:
        return [t == "attention" and self.window is not None for t in self.mixer_types]

    @property
    def is_linear(self) -> list[bool]:
        return [t == "memory" for t in self.mixer_types]

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.mixer_types)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    # ---- filling -------------------------------------------------------------------------------------

    def trim(self) -> None:
        """Keep only the attention columns a sliding window can still reach."""
        if self.window is not None and self.valid is not None and self.valid.shape[1] > self.window:
            self._drop_columns(self.valid.shape[1] - self.window)

    def _drop_columns(self, n: int) -> None:
        self.valid = self.valid[:, n:]
        for i in self.keys:
            self.keys[i] = self.keys[i][:, :, n:]
            self.values[i] = self.values[i][:, :, n:]

    def append_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, h, T, d] (every row's T new real tokens) -> all keys and values of the layer."""
        if layer_idx in self.keys:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], 2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], 2)
        else:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        return self.keys[layer_idx], self.values[layer_idx]

    # ---- batch reordering (beam search, num_return_sequences) ------------------------------------------

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (new row i is old row indices[i]); groups are re-formed accordingly."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        old = indices.tolist()
        group_of, slot = {}, {}
        for g, rows in enumerate(self.groups):
            for s, r in enumerate(rows.tolist()):
                group_of[r], slot[r] = g, s
        new_groups, new_memory = [], {i: [] for i in self.memory}
        for g, rows in enumerate(self.groups):
            members = [i for i, r in enumerate(old) if group_of[r] == g]
            if not members:
                continue
            new_groups.append(torch.tensor(members, dtype=torch.long, device=rows.device))
            take = torch.tensor([slot[old[i]] for i in members], dtype=torch.long)
            for i in self.memory:
                new_memory[i].append(tree_index(self.memory[i][g], take))
        self.groups, self.memory = new_groups, new_memory
        dev = self.lengths.device
        self.lengths = self.lengths.index_select(0, indices.to(dev))
        self.valid = self.valid.index_select(0, indices.to(self.valid.device))
        for i in self.keys:
            self.keys[i] = self.keys[i].index_select(0, indices.to(self.keys[i].device))
            self.values[i] = self.values[i].index_select(0, indices.to(self.values[i].device))
        used = self.valid.any(0)
        if self.valid.shape[1] and not bool(used.all()):  # leading columns that no kept row uses
            self._drop_columns(int(used.long().argmax()) if bool(used.any()) else self.valid.shape[1])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a Miras memory cannot forget tokens: MirascCache cannot be cropped")

    def reset(self) -> None:
        self.__init__(self.mixer_types, self.window)
