"""open_clip's table of pretrained weights, and which of them are cached here, read without torch.

``import open_clip`` imports torch, torchvision and transformers (seconds, and most of the time
``clipxfer models`` took); the table itself is plain data in ``open_clip/pretrained.py``. That file
is loaded on its own, as a module of a private package over open_clip's folder, so it shares
nothing with a real ``import open_clip`` later in the same process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ClipxferError

_PRIVATE_PACKAGE = "_clipxfer_open_clip_table"


@lru_cache(maxsize=1)
def pretrained_table():
    """The module holding open_clip's pretrained table (``list_pretrained``, ``get_pretrained_cfg``):
    open_clip itself when already imported, else its ``pretrained.py`` alone."""
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.pretrained")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ClipxferError("open_clip is not installed: pip install clipxfer (it is a core dependency)")
    package = types.ModuleType(_PRIVATE_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[_PRIVATE_PACKAGE] = package
    # pretrained.py tries `import safetensors.torch` (which imports torch) only to note that it
    # exists; a None entry makes that import fail fast, and the table does not need it.
    blocked = "safetensors.torch" not in sys.modules
    if blocked:
        sys.modules["safetensors.torch"] = None
    try:
        return importlib.import_module(f"{_PRIVATE_PACKAGE}.pretrained")
    finally:
        if blocked:
            del sys.modules["safetensors.torch"]


def _hf_cached_file(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def cached_weights(model_name: str, tag: str) -> str | None:
    """Path of the cached weights for an open_clip ``model_name``/``tag`` pair, or None."""
    cfg = pretrained_table().get_pretrained_cfg(model_name, tag)
    if not cfg:
        return None
    hub = cfg.get("hf_hub", "")
    if hub:
        # open_clip's own convention: 'org/repo/' means the default file names, 'org/repo/file' one file.
        repo_id, filename = os.path.split(hub)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for name in candidates:
            found = _hf_cached_file(repo_id, name)
            if found:
                return found
    url = cfg.get("url", "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
        if local.is_file():
            return str(local)
    return None


def hf_hub_model_cached(repo_id: str) -> bool:
    """True when an ``hf-hub:`` model's config is in the local Hugging Face cache."""
    return _hf_cached_file(repo_id, "open_clip_config.json") is not None


def list_pretrained_pairs() -> list[dict]:
    """Every ``model:pretrained`` pair open_clip knows, with whether its weights are cached here."""
    return [
        {"spec": f"{model}:{tag}", "model": model, "pretrained": tag, "cached": cached_weights(model, tag) is not None}
        for model, tag in pretrained_table().list_pretrained()
    ]
