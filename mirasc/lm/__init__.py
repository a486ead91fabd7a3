"""The causal language model around a generated Miras block (Hugging Face transformers)."""
