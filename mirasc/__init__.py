"""mirasc: compile `.miras` specs into Miras associative-memory layers.

    import mirasc
    mod = mirasc.load("examples/moneta.miras")      # compile (cached) and import
    layer = mod.Moneta(d_model=1024)

The pipeline is parse -> check -> derive -> emit; see mirasc.compiler.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .compiler import compile_file, compile_spec, load, load_source

__all__ = ["__version__", "compile_file", "compile_spec", "load", "load_source"]
