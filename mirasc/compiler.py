"""The pipeline in one place: spec text -> LayerSpec -> LayerIR -> Python module, and the load cache."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass
from functools import lru_cache
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
    from .frontend import read_spec_text

    path = Path(path)
    compiled = compile_spec(read_spec_text(path), str(path))
    out = Path(out_dir) / f"{compiled.stem}.py"
    _write_atomic(out, compiled.source)
    return out


def cache_dir() -> Path:
    """$MIRASC_CACHE, else ~/.cache/mirasc (a temporary folder when there is no home)."""
    env = os.environ.get("MIRASC_CACHE")
    if env:
        return Path(env)
    try:
        return Path.home() / ".cache" / "mirasc"
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return _fallback_cache_dir()


def _fallback_cache_dir() -> Path:
    """A per-user folder in the temporary directory, for when the cache folder cannot be written."""
    return Path(tempfile.gettempdir()) / f"mirasc-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _private(folder: Path) -> None:
    """Create `folder` for this user only; refuse one that another user owns or may write (its modules
    would be imported, so a shared temporary directory must not let anyone else plant them)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise PermissionError(13, "owned or writable by another user", str(folder))


# The generated source depends on the spec text and on mirasc's own code, templates and grammar: all of
# them go into the cache key, so an edited mirasc never imports a module an older one wrote.
_TOOLCHAIN_SUFFIXES = {".py", ".j2", ".lark"}
MARKER = "# mirasc-cache-check sha256="  # the last line of a cached file: the hash of everything above
STALE_TMP_SECONDS = 60


@lru_cache(maxsize=1)
def toolchain_hash() -> str:
    """sha256 over the mirasc package's code files, the templates and the grammar (once per process)."""
    from ._resources import resource_dir

    roots = [Path(__file__).resolve().parent, resource_dir("templates"), resource_dir("grammar")]
    digest = hashlib.sha256(__version__.encode())
    for root in dict.fromkeys(r.resolve() for r in roots):
        files = sorted(p for p in root.rglob("*") if p.suffix in _TOOLCHAIN_SUFFIXES and p.is_file()
                       and "__pycache__" not in p.parts)
        for f in files:
            digest.update(f"\0{root.name}/{f.relative_to(root).as_posix()}\0".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def cache_key(text: str) -> str:
    """The cache key of spec text: the spec and the toolchain that compiles it."""
    return spec_hash(toolchain_hash() + "\0" + text)[:24]


def _sealed(source: str) -> str:
    """The source with a last line that carries its own hash, so a cut or garbled file is detected."""
    body = source if source.endswith("\n") else source + "\n"
    return f"{body}{MARKER}{spec_hash(body)}\n"


def _intact(path: Path) -> bool:
    """Whether the cached file ends in a marker line whose hash matches everything above it."""
    try:
        data = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, sep, tail = data.rstrip("\n").rpartition("\n" + MARKER)
    return bool(sep) and spec_hash(body + "\n") == tail.strip()


def _clean_stale_tmp(folder: Path) -> None:
    """Remove temporary files that a killed writer left between write and rename (older than a minute)."""
    cutoff = time.time() - STALE_TMP_SECONDS
    try:
        entries = list(folder.glob(".*.tmp"))
    except OSError:
        return
    for tmp in entries:
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:  # another process removed or renamed it first
            pass


def load(path: str | os.PathLike) -> types.ModuleType:
    """Compile the spec file at `path` (once per content and mirasc version) and import the result."""
    from .frontend import read_spec_text  # bytes that are not UTF-8 are a located SpecError

    return load_source(read_spec_text(path), str(path))


def load_source(text: str, file: str = "<spec>") -> types.ModuleType:
    """Compile spec text (once per content and toolchain) into the cache and import the result.

    The cache key is the sha256 of the spec text and of mirasc's code, templates and grammar
    (`toolchain_hash`), so an edited spec or an edited mirasc compiles again, while repeated loads, also
    from several processes, reuse one file.  A cached file is imported only when its last line's hash
    matches its contents (else it is compiled again); files are written to a temporary name and renamed,
    and temporaries a killed writer left behind are removed after a minute.  When the cache folder
    cannot be written, a per-user temporary folder is used instead, with a warning.  `file` names the
    spec in error messages and gives the cached module its stem.
    """
    key = cache_key(text)
    stem = f"{_stem(file, 'layer')}_{key}"
    name = f"mirasc_generated.{stem}"
    if name in sys.modules:
        return sys.modules[name]
    return import_file(name, _cached(text, file, stem))


def import_file(name: str, path: str | os.PathLike) -> types.ModuleType:
    """Import the Python file at `path` as module `name`, registered in sys.modules (and removed again
    when it fails). From a file, not a string: Triton's jit reads a kernel's source from its file."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _cached(text: str, file: str, stem: str) -> Path:
    """The path of an intact cached module for `text`, compiling and writing it when needed."""
    folders = [cache_dir(), _fallback_cache_dir()]
    source: str | None = None
    failure: OSError | None = None
    for i, folder in enumerate(folders):
        target = folder / f"{stem}.py"
        try:
            if folder == folders[1]:
                _private(folder)
        except OSError as exc:
            failure = exc
            continue
        if _intact(target):
            return target
        if source is None:
            source = _sealed(compile_spec(text, file).source)
        try:
            _write_atomic(target, source)
            _clean_stale_tmp(folder)
        except OSError as exc:
            failure = exc
            if i == 0:
                warnings.warn(f"mirasc: cannot write the cache {folder} ({exc.strerror or exc}); "
                              f"using {folders[1]} (set MIRASC_CACHE to choose)", RuntimeWarning, stacklevel=3)
            continue
        return target
    raise OSError(f"cannot write the mirasc cache in {folders[0]} or {folders[1]}: {failure}")
