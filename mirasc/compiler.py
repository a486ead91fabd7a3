"""The pipeline in one place: spec text -> LayerSpec -> LayerIR -> Python module, and the load cache."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from . import __version__


@dataclass(frozen=True)
class Compiled:
    """What a compilation produced: the module's source, its suggested file stem and the IR."""
    source: str
    stem: str
    ir: object


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stem(file: str, layer_name: str) -> str:
    """The generated file's name: the spec's file stem when it is a valid module name, else the layer's."""
    stem = Path(file).stem.replace("-", "_")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", stem):
        stem = re.sub(r"(?<!^)(?=[A-Z])", "_", layer_name).lower()
    return stem


def compile_spec(text: str, file: str = "<spec>") -> Compiled:
    """Compile spec text into module source. Raises mirasc.frontend.errors.SpecError on a bad spec."""
    from .codegen.emit import emit_module
    from .frontend import load_spec
    from .symbolic.derive import derive

    spec = load_spec(text, file)
    ir = derive(spec)
    return Compiled(emit_module(ir, __version__), _stem(file, spec.name), ir)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a unique temporary file and rename, so concurrent writers never expose a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def compile_file(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Compile the spec at `path` and write `<out_dir>/<stem>.py`; returns the written path."""
    path = Path(path)
    compiled = compile_spec(path.read_text(encoding="utf-8"), str(path))
    out = Path(out_dir) / f"{compiled.stem}.py"
    _write_atomic(out, compiled.source)
    return out


def cache_dir() -> Path:
    """$MIRASC_CACHE, else ~/.cache/mirasc."""
    env = os.environ.get("MIRASC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mirasc"


def load(path: str | os.PathLike) -> types.ModuleType:
    """Compile the spec file at `path` (once per content and mirasc version) and import the result."""
    path = Path(path)
    return load_source(path.read_text(encoding="utf-8"), str(path))


def load_source(text: str, file: str = "<spec>") -> types.ModuleType:
    """Compile spec text (once per content and mirasc version) into the cache and import the result.

    The cache key is the sha256 of the spec text and the mirasc version, so an edited spec or a new
    mirasc compiles again while repeated loads, also from several processes, reuse one file. `file`
    names the spec in error messages and gives the cached module its stem.
    """
    key = spec_hash(text + "\0" + __version__)[:20]
    target = cache_dir() / f"{_stem(file, 'layer')}_{key}.py"
    if not target.exists():
        _write_atomic(target, compile_spec(text, file).source)
    name = f"mirasc_generated.{target.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
