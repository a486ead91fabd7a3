"""Where the grammar and the templates live, in a source tree and in an installed wheel."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def resource_dir(name: str) -> Path:
    """The folder `grammar` or `templates`: beside the package in a checkout, inside it when installed."""
    local = _ROOT / name
    if (local / "__init__.py").exists():
        return local
    return Path(str(resources.files(f"mirasc.{name}")))
