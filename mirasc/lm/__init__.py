"""The causal language model around a generated Miras block (Hugging Face transformers).

    import mirasc.lm
    config = mirasc.lm.MirascConfig(spec=open("examples/gated_deltanet.miras").read(),
                                    spec_file="gated_deltanet.miras", hidden_size=256, num_hidden_layers=4)
    model = mirasc.lm.MirascForCausalLM(config)

Importing this package registers model_type "mirasc" with AutoConfig and AutoModelForCausalLM, so
`AutoModelForCausalLM.from_pretrained(dir)` reloads a saved model (recompiling its spec through the cache).
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import MirascCache
from .config import MirascConfig
from .model import MirascForCausalLM, MirascModel
from .speed import decode_speed

AutoConfig.register("mirasc", MirascConfig, exist_ok=True)
AutoModelForCausalLM.register(MirascConfig, MirascForCausalLM, exist_ok=True)

__all__ = ["MirascCache", "MirascConfig", "MirascForCausalLM", "MirascModel", "decode_speed"]
