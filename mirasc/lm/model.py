"""MirascForCausalLM: a Hugging Face causal LM whose mixing layers are the generated block of any `.miras` spec.

embedding -> N x [RMSNorm -> mixer -> residual; RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> tied head.
A mixer is the spec's Miras block (Behrouz et al. 2025, §5.4) or, every `attn_every`-th layer, causal
softmax attention with RoPE (the hybrid "-H" models of §5.3). The generated module is used only through
its public API: the block class, its forward(x, state, *, cu_seqlens) and the LayerState / DecodeState
it returns.
"""
from __future__ import annotations

import inspect
import sys
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import MirascCache, memory_pos, tree_cat, tree_index
from .config import MirascConfig
from .ops import rms_norm, swiglu

IGNORE = -100
# transformers renamed the outputs' past_key_values to cache (5.2x); either is accepted and returned
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out) -> MirascCache | None:
    """The cache of a model output, under this transformers version's field name."""
    return getattr(out, CACHE_FIELD, None)


def load_block_class(config: MirascConfig) -> type[nn.Module]:
    """Compile the config's spec through mirasc's content-hash cache and return its block class."""
    import mirasc
    from mirasc.frontend import load_spec

    if not config.spec:
        raise ValueError("MirascConfig.spec is empty: pass the text of a .miras spec")
    module = mirasc.load_source(config.spec, config.spec_file)
    return getattr(module, load_spec(config.spec, config.spec_file).name)


def _mark_for_init(module: nn.Module) -> None:
    """Flag the module's own Linear children for _init_weights (which sees leaf modules one by one)."""
    for child in module.children():
        child._mirasc_init = True


class MirascRMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in float32 (ops.rms_norm: keeps only its input and 1/rms for
    the backward). Under autocast the output is cast once to the autocast dtype: its consumers are
    projections, which would each cast it (and keep each copy for the backward)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MirascMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        _mark_for_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [B, h, T, d] at positions pos [T] or [B, T]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = pos.to(torch.float32)[..., None] * inv_freq  # [(B,) T, d/2]
    if angles.dim() == 3:
        angles = angles[:, None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.float().chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility: key j is seen from query i when 0 <= i - j < window."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    return allowed


class MirascAttention(nn.Module):
    """Causal softmax attention with RoPE; optionally a sliding window of `window` keys (itself included)."""

    def __init__(self, config: MirascConfig, heads: int):
        super().__init__()
        d = config.hidden_size
        if d % heads or (d // heads) % 2:
            raise ValueError(f"attention needs hidden_size ({d}) divisible by attn_heads ({heads}) "
                             f"into an even head dim (RoPE)")
        self.heads, self.head_dim = heads, d // heads
        self.window, self.theta = config.attn_window, config.rope_theta
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        _mark_for_init(self)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return apply_rope(q, pos, self.theta), apply_rope(k, pos, self.theta), v

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _one(self, x: torch.Tensor):
        """x [B, T, d], one fresh sequence per row -> (y, (k, v))."""
        pos = torch.arange(x.shape[1], device=x.device)
        q, k, v = self._qkv(x, pos)
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(pos, pos, self.window))
        return self._out(o), (k, v)

    def forward(self, x: torch.Tensor, bounds: list[int] | None = None):
        """Fresh sequences -> (y, (k, v)); with bounds (cu_seqlens as a list) each packed document is
        attended on its own (positions restart at 0), so no token sees another; (k, v) is then None."""
        if bounds is None:
            return self._one(x)
        ys = [self._one(x[:, a:b])[0] for a, b in pairwise(bounds)]
        return torch.cat(ys, 1), None

    def forward_cached(self, x: torch.Tensor, cache: MirascCache, layer_idx: int, pos: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """T new tokens per row after the cached ones: pos [B, T] their RoPE positions, mask [B, 1, T, S]
        the visible key columns (cached ones included)."""
        q, k, v = self._qkv(x, pos)
        keys, values = cache.append_kv(layer_idx, k, v)
        return self._out(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))


class MirascDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual layer: x + mixer(norm(x)), then + SwiGLU(norm(.))."""

    def __init__(self, config: MirascConfig, kind: str, block_class: type[nn.Module] | None,
                 block_kwargs: dict, attn_heads: int):
        super().__init__()
        self.kind = kind
        d = config.hidden_size
        self.mixer_norm = MirascRMSNorm(d, config.rms_norm_eps)
        if kind == "memory":
            self.mixer = block_class(d, **block_kwargs)
            self._block_packs = "cu_seqlens" in inspect.signature(self.mixer.forward).parameters
        else:
            self.mixer = MirascAttention(config, attn_heads)
        self.mlp_norm = MirascRMSNorm(d, config.rms_norm_eps)
        self.mlp = MirascMLP(d, config.intermediate_size)

    def _memory(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, bounds: list[int] | None):
        if cu_seqlens is None:
            return self.mixer(x)
        if self._block_packs:
            return self.mixer(x, cu_seqlens=cu_seqlens)
        # a block compiled before packed forwards existed: one fresh call per document
        bounds = bounds if bounds is not None else cu_seqlens.tolist()
        return torch.cat([self.mixer(x[:, a:b])[0] for a, b in pairwise(bounds)], 1), None

    def forward(self, h: torch.Tensor, cu_seqlens: torch.Tensor | None = None, bounds: list[int] | None = None):
        """Fresh sequences -> (h, state): a LayerState for memory layers, (k, v) for attention. Packed
        documents come as cu_seqlens and, read once on the host, as the list bounds."""
        r = self.mixer_norm(h)
        y, state = self._memory(r, cu_seqlens, bounds) if self.kind == "memory" else self.mixer(r, bounds)
        h = h + y
        return h + self.mlp(self.mlp_norm(h)), state

    def forward_cached(self, h: torch.Tensor, cache: MirascCache, layer_idx: int, pos: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """New tokens continuing the cached rows; updates the cache."""
        r = self.mixer_norm(h)
        if self.kind == "memory":
            states = cache.memory[layer_idx]
            if len(cache.groups) == 1:  # one group holds every row, in order
                y, states[0] = self.mixer(r, states[0])
            else:
                y = torch.empty_like(h)
                for g, rows in enumerate(cache.groups):
                    y_g, states[g] = self.mixer(r.index_select(0, rows), states[g])
                    y = y.index_copy(0, rows, y_g)
        else:
            y = self.mixer.forward_cached(r, cache, layer_idx, pos, mask)
        h = h + y
        return h + self.mlp(self.mlp_norm(h))


class MirascPreTrainedModel(PreTrainedModel):
    config_class = MirascConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["MirascDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for the embedding, attention and MLP projections, ones for the norms.
        The Miras blocks keep the initialisation their own constructor gives (gate biases at the spec's
        init values, the learned W_0), so their submodules are left alone."""
        std = self.config.initializer_range
        ours = isinstance(module, nn.Embedding) or (
            isinstance(module, nn.Linear) and getattr(module, "_mirasc_init", False))
        if ours:
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MirascRMSNorm):
            init.ones_(module.weight)


class MirascModel(MirascPreTrainedModel):
    """The stack without its head: input_ids -> final-normed hidden states (and the decoding cache)."""

    def __init__(self, config: MirascConfig):
        super().__init__(config)
        types = config.mixer_types
        block_class = load_block_class(config) if "memory" in types else None
        block_kwargs = {name: value for name, value in (
            ("heads", config.heads), ("key_dim", config.head_dim), ("value_dim", config.head_dim),
            ("chunk_size", config.chunk_size), ("backend", config.backend)) if value is not None}
        heads = config.attn_heads or config.heads or (
            sys.modules[block_class.__module__].HEADS if block_class is not None else 1)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MirascDecoderLayer(config, kind, block_class, block_kwargs, heads)
                                    for kind in types)
        self.norm = MirascRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # ---- fresh sequences -------------------------------------------------------------------------------

    def _run(self, ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """Every row (or packed document) from a fresh state -> (h before the final norm, per-layer states)."""
        h = self.embed_tokens(ids)
        states = []
        # attention runs one call per document: read the offsets on the host once, not in every layer
        bounds = cu_seqlens.tolist() if cu_seqlens is not None and "attention" in self.config.mixer_types else None
        for layer in self.layers:
            h, state = layer(h, cu_seqlens, bounds)
            states.append(state)
        return h, states

    def _run_rows(self, input_ids: torch.Tensor, mask: torch.Tensor | None, build_cache: bool):
        """Each row on its real tokens only (mask 1; pads never reach a memory), rows of equal real length
        batched together -> (h [B, T, d], zeros at pads; the MirascCache after the prompts, or None)."""
        B, T = input_ids.shape
        if mask is None:
            groups = [(T, torch.arange(B, device=input_ids.device), None)]
        else:
            real = mask.bool()
            lengths = real.sum(1)
            if bool((lengths == 0).any()):
                raise ValueError("a row of attention_mask has no real token")
            groups = [(int(n), (lengths == n).nonzero().squeeze(1), real) for n in lengths.unique().tolist()]
        h_out = None
        runs = []
        for n, rows, real in groups:
            ids = input_ids if real is None else input_ids.index_select(0, rows)[real.index_select(0, rows)]
            h, states = self._run(ids.view(len(rows), n))
            if real is None:
                h_out = h
            else:
                if h_out is None:
                    h_out = h.new_zeros(B, T, h.shape[-1])
                r, c = real.index_select(0, rows).nonzero(as_tuple=True)
                h_out = h_out.index_put((rows[r], c), h.reshape(-1, h.shape[-1]))
            runs.append((n, rows, states))
        return h_out, (self._build_cache(runs, B, input_ids) if build_cache else None)

    def _build_cache(self, runs: list, B: int, input_ids: torch.Tensor) -> MirascCache:
        """The cache after the prompts: attention keys right aligned, memory rows grouped by chunk position."""
        config = self.config
        cache = MirascCache(config.mixer_types, config.attn_window)
        device = input_ids.device
        S = max(n for n, _, _ in runs)
        cache.valid = torch.zeros(B, S, dtype=torch.bool, device=device)
        cache.lengths = torch.zeros(B, dtype=torch.long, device=device)
        for n, rows, _ in runs:
            cache.valid[rows, S - n:] = True
            cache.lengths[rows] = n
        by_pos: dict[int, list] = {}
        for n, rows, states in runs:
            poss = {memory_pos(s) for s, kind in zip(states, config.mixer_types) if kind == "memory"}
            if len(poss) > 1:
                raise RuntimeError(f"memory layers disagree on the chunk position: {poss}")
            by_pos.setdefault(poss.pop() if poss else 0, []).append((rows, states))
        orders = []  # each group's rows ascending (a group of all rows is then 0..B-1, the batch as it is)
        for members in by_pos.values():
            rows = torch.cat([rows for rows, _ in members])
            rows, order = rows.sort()
            cache.groups.append(rows)
            orders.append(order)
        for i, kind in enumerate(config.mixer_types):
            if kind == "memory":
                cache.memory[i] = [tree_index(tree_cat([states[i] for _, states in members]), order)
                                   for members, order in zip(by_pos.values(), orders)]
            else:
                k0, v0 = runs[0][2][i]
                keys = k0.new_zeros(B, k0.shape[1], S, k0.shape[3])
                values = v0.new_zeros(B, v0.shape[1], S, v0.shape[3])
                for n, rows, states in runs:
                    k, v = states[i]
                    keys[rows, :, S - n:] = k
                    values[rows, :, S - n:] = v
                cache.keys[i], cache.values[i] = keys, values
        cache.seen = input_ids.shape[1]
        cache.trim()
        return cache

    # ---- continuing cached rows ------------------------------------------------------------------------

    def _run_cached(self, input_ids: torch.Tensor, cache: MirascCache) -> torch.Tensor:
        """T new real tokens for every row of the cache -> h [B, T, d] before the final norm."""
        B, T = input_ids.shape
        if B != cache.batch_size:
            raise ValueError(f"the cache holds {cache.batch_size} rows, input_ids has {B}")
        device = input_ids.device
        offsets = torch.arange(T, device=device)
        pos = cache.lengths[:, None] + offsets                                     # [B, T] RoPE positions
        S = cache.valid.shape[1]
        valid = torch.cat([cache.valid, torch.ones(B, T, dtype=torch.bool, device=device)], 1)
        mask = valid[:, None, :] & _window_mask(S + offsets, torch.arange(S + T, device=device),
                                                cache.window)[None]
        mask = mask[:, None]                                                       # [B, 1, T, S + T]
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer.forward_cached(h, cache, i, pos, mask)
        cache.valid = valid
        cache.lengths = cache.lengths + T
        cache.seen += T
        cache.trim()
        return h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: MirascCache | None = None, use_cache: bool | None = None,
                cu_seqlens: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPast:
        """See MirascForCausalLM.forward."""
        if cache is None and kwargs.get("past_key_values") is not None:
            cache = kwargs["past_key_values"]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        if cu_seqlens is not None:
            if cache is not None or use_cache:
                raise ValueError("cu_seqlens (packed training documents) cannot be combined with a cache")
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("with cu_seqlens every token is real: pass no padding in attention_mask")
            if input_ids.shape[0] != 1:
                raise ValueError(f"with cu_seqlens, input_ids holds the packed documents in one row "
                                 f"[1, total], got shape {list(input_ids.shape)}")
            h, _ = self._run(input_ids, cu_seqlens)
            return BaseModelOutputWithPast(last_hidden_state=self.norm(h))
        if cache is not None and cache.is_initialized:
            T = input_ids.shape[1]
            if attention_mask is not None and T > 1 and not bool(attention_mask[:, -T:].bool().all()):
                raise ValueError("tokens after a cache must all be real (attention_mask 1)")
            h = self._run_cached(input_ids, cache)
            return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{CACHE_FIELD: cache})
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None
        if attention_mask is None and not use_cache:
            h, _ = self._run(input_ids)
            return BaseModelOutputWithPast(last_hidden_state=self.norm(h))
        h, new_cache = self._run_rows(input_ids, attention_mask, build_cache=bool(use_cache) or cache is not None)
        if cache is not None:  # an empty cache object handed in: fill it
            cache.__dict__.update(new_cache.__dict__)
            new_cache = cache
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{CACHE_FIELD: new_cache})


class MirascForCausalLM(MirascPreTrainedModel, GenerationMixin):
    """MirascModel + a language-model head tied to the embedding.

    forward(input_ids [B, T] | [1, total], attention_mask, labels, cache / past_key_values, use_cache,
    cu_seqlens, logits_to_keep) -> CausalLMOutputWithPast(loss, logits, cache).
    - labels: HF convention, shifted inside (position t predicts token t + 1), -100 ignored, mean
      cross-entropy. With cu_seqlens the first token of every document is never a target (its
      prediction would cross the document boundary).
    - cu_seqlens [N + 1] (int): packed documents in one row; each starts from a fresh memory and
      convolution window, attention stays inside its document.
    - attention_mask with zeros (left padding): every row runs on its own real tokens; pads get zero
      logits and never enter a memory or an attention cache.
    - use_cache=True (or a cache passed in) returns a MirascCache; a later call with it continues every
      row by the new tokens (generate() feeds one token per step).
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MirascConfig):
        super().__init__(config)
        self.model = MirascModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head._mirasc_init = True  # initialised like the embedding when not tied to it
        self.post_init()

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """config.json (spec text included) and model.safetensors, plus the spec as <spec_file> for humans."""
        result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process and self.config.spec:
            name = Path(self.config.spec_file).name or "layer.miras"
            (Path(save_directory) / name).write_text(self.config.spec, encoding="utf-8")
        return result

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own MirascCache in the prefill forward

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: MirascCache | None = None,
                use_cache: bool | None = None, cu_seqlens: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: MirascCache | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """See the class docstring."""
        cache = cache if cache is not None else past_key_values
        out = self.model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                         cu_seqlens=cu_seqlens)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h_kept = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h_kept = h[:, logits_to_keep]
        logits = self.lm_head(h_kept)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {list(input_ids.shape)}, "
                                 f"got {list(labels.shape)}")
            full = logits if h_kept is h else self.lm_head(h)
            targets = labels[:, 1:]
            if cu_seqlens is not None and cu_seqlens.numel() > 2:
                targets = targets.clone()
                targets[0, cu_seqlens[1:-1].long() - 1] = IGNORE  # document starts are not predicted
            loss = F.cross_entropy(full[:, :-1].float().reshape(-1, full.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: output_cache(out)})
