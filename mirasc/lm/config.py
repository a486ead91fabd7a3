"""MirascConfig: the Hugging Face configuration of a causal LM whose mixing layers are a compiled Miras block.

The spec text itself is a field, so a saved config.json is enough to recompile the exact layer.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class MirascConfig(PretrainedConfig):
    """A decoder-only LM: byte embedding -> N x [RMSNorm -> mixer -> +; RMSNorm -> SwiGLU -> +] -> RMSNorm -> head.

    spec / spec_file: the `.miras` text and a file name for it (messages, the compile cache's file stem,
        the copy written beside save_pretrained's weights).
    heads / head_dim / chunk_size: overrides of the spec's HEADS, KEY_DIM = VALUE_DIM and CHUNK_SIZE
        (None keeps the spec's). head_dim sets key and value dims together (an MLP memory with a residual
        needs them equal).
    attn_every: 0 for a pure Miras stack; k > 0 makes every k-th layer (layers k-1, 2k-1, ...) softmax
        attention with RoPE instead (the paper's hybrid "-H" variants, §5.3); attn_window: None for full
        causal attention, else each token sees itself and the window - 1 tokens before it; attn_heads:
        None takes the memory layers' head count.
    backend: the generated block's backend ("auto", "torch", "reference", "triton").
    """

    model_type = "mirasc"

    spec: str | None = None
    spec_file: str = "layer.miras"
    vocab_size: int = 256
    hidden_size: int = 256
    num_hidden_layers: int = 4
    intermediate_size: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    chunk_size: int | None = None
    backend: str = "auto"
    attn_every: int = 0
    attn_window: int | None = None
    attn_heads: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            # SwiGLU's usual 8/3 d, rounded up to a multiple of 16
            self.intermediate_size = -(-8 * self.hidden_size // 3 // 16) * 16
        if self.attn_every < 0:
            raise ValueError(f"attn_every must be >= 0, got {self.attn_every}")
        if self.attn_window is not None and self.attn_window < 1:
            raise ValueError(f"attn_window must be None or >= 1, got {self.attn_window}")
        if self.backend not in ("auto", "torch", "reference", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch', 'reference' or 'triton', got {self.backend!r}")
        super().__post_init__(**kwargs)

    @property
    def mixer_types(self) -> list[str]:
        """"memory" or "attention" for every layer."""
        k = self.attn_every
        return ["attention" if k and (i + 1) % k == 0 else "memory" for i in range(self.num_hidden_layers)]
