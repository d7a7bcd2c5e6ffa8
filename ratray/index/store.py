"""The index on disk: the one owner of its format (shard files, manifest, versions/, CURRENT).

A plain index folder holds `shard_{i}.faiss` (plain `faiss.write_index`), `shard_{i}.ids.npy`
(int64 chunk id of every row of that shard) and `manifest.json` (written last). A versioned root
(REALM's refreshed index, a live database) holds `versions/v000001/`, `versions/v000002/`, ...
(each a plain index folder) and `CURRENT`, the relative path of the serving one, rewritten
atomically. Folders are written under a temporary name and renamed into place, never half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from ratray.index.factory import IndexBuildError, faiss_message, set_pq_tables, set_search_params
from ratray.index.search import enable_reconstruct

MANIFEST = "manifest.json"
CURRENT = "CURRENT"  # in a versioned index root: the folder (relative) of the serving version
VERSIONS = "versions"


# ---------------------------------------------------------------------------------------------
# manifest


@dataclass
class Manifest:
    """What `manifest.json` holds: how the shards were built and where they are."""

    version: int
    factory: str  # the factory actually built (after auto / clamping)
    factory_requested: str  # what the config asked for
    metric: str  # "l2" | "ip"
    dim: int
    embedding_model: str
    ntotal: int
    nprobe: int  # 0 when the index has no IVF
    ef_search: int
    chunk_store: str
    shards: list[dict]  # [{"file": "shard_0.faiss", "ids": "shard_0.ids.npy", "size": 123}]
    created: str  # ISO 8601, UTC
    extra: dict = field(default_factory=dict)  # nlist, training size, recall measurements, timings

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise IndexBuildError("manifest must be a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in data and k != "extra"]
        if missing:
            raise IndexBuildError(f"manifest is missing keys: {', '.join(missing)}")
        return cls(**{k: data[k] for k in names if k in data})


def load_manifest(index_dir: str | Path) -> Manifest:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise IndexBuildError(f"no index at {index_dir}: {path} does not exist")
    try:
        return Manifest.from_json(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise IndexBuildError(f"{path}: corrupt manifest ({e})") from None
    except IndexBuildError as e:
        raise IndexBuildError(f"{path}: {e}") from None



def load_shard(index_dir: str | Path, i: int, manifest: Manifest | None = None,
               reconstruct: bool = True) -> tuple[faiss.Index, np.ndarray]:
    """Read shard `i` (its FAISS index and row -> chunk id map), with search params applied.

    `reconstruct` builds the IVF direct map (8 bytes per vector) that exact tie-breaking needs."""
    index_dir = Path(index_dir)
    m = manifest or load_manifest(index_dir)
    if not 0 <= i < m.num_shards:
        raise IndexBuildError(f"{index_dir}: shard {i} out of range (index has {m.num_shards})")
    entry = m.shards[i]
    index_path, ids_path = index_dir / entry["file"], index_dir / entry["ids"]
    for p in (index_path, ids_path):
        if not p.is_file():
            raise IndexBuildError(f"shard {i}: missing file {p}")
    tables = m.extra.get("pq_tables")  # False: IVF-PQ lookup tables per probe (build.py)
    try:
        index = faiss.read_index(str(index_path),
                                 faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE if tables is False else 0)
    except RuntimeError as e:
        raise IndexBuildError(f"{index_path}: not a readable FAISS index ({faiss_message(e)})"
                              ) from None
    try:
        ids = np.load(ids_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexBuildError(f"{ids_path}: not a readable .npy id array ({e})") from None
    if index.d != m.dim:
        raise IndexBuildError(f"{index_path}: dimension {index.d} != manifest dim {m.dim}")
    if not (index.ntotal == len(ids) == entry["size"]):
        raise IndexBuildError(f"{index_path}: {index.ntotal} vectors, {len(ids)} ids in "
                              f"{ids_path.name}, manifest says {entry['size']}")
    set_search_params(index, m.nprobe, m.ef_search)
    if tables is False:
        set_pq_tables(index, False)
    if reconstruct:
        enable_reconstruct(index)
    return index, ids.astype(np.int64, copy=False)




# ---------------------------------------------------------------------------------------------
# writing an index folder


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_index_dir(out_dir: str | Path, shards: list[tuple[faiss.Index, np.ndarray]],
                    manifest: Manifest) -> None:
    """Write `shards` (index, chunk ids) and `manifest` (its `shards` entries filled here) into a
    fresh sibling folder, then swap it in for `out_dir` with a rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest.shards = []
        for s, (index, shard_ids) in enumerate(shards):
            entry = {"file": f"shard_{s}.faiss", "ids": f"shard_{s}.ids.npy",
                     "size": int(index.ntotal)}
            faiss.write_index(index, str(tmp / entry["file"]))
            np.save(tmp / entry["ids"], shard_ids)
            manifest.shards.append(entry)
        (tmp / MANIFEST).write_text(manifest.to_json())
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(index_dir: str | Path, manifest: Manifest) -> None:
    """Rewrite the manifest of an existing index folder atomically (write + rename)."""
    path = Path(index_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp`: two renames (never a half-written index), then clean up."""
    old = None
    if out_dir.exists():
        if not out_dir.is_dir():
            raise IndexBuildError(f"{out_dir} exists and is not a directory")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



# ---------------------------------------------------------------------------------------------
# versions and CURRENT


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / VERSIONS / f"v{int(version):06d}"


def versions_on_disk(root: str | Path) -> list[int]:
    """The complete versions under `root/versions` (a manifest written), oldest first."""
    vdir = Path(root) / VERSIONS
    if not vdir.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in vdir.iterdir()
                  if p.name.startswith("v") and p.name[1:].isdigit() and (p / MANIFEST).is_file())


def is_versioned(root: str | Path) -> bool:
    return (Path(root) / CURRENT).is_file()


def serving_dir(root: str | Path) -> Path:
    """The folder holding the serving index of `root`: root/CURRENT's target, else root itself."""
    root = Path(root)
    cur = root / CURRENT
    if cur.is_file():
        target = root / cur.read_text().strip()
        if not (target / MANIFEST).is_file():
            raise FileNotFoundError(f"{cur} names {target}, which holds no index")
        return target
    return root


def write_current(root: str | Path, target: str | Path) -> None:
    """Point root/CURRENT at `target` (a folder inside root), atomically (write + rename)."""
    root = Path(root)
    rel = os.path.relpath(Path(target).resolve(), root.resolve())
    if rel.startswith(".."):
        raise ValueError(f"{target} is not inside the index root {root}")
    tmp = root / f".{CURRENT}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(rel + "\n")
    os.replace(tmp, root / CURRENT)


def remove_version(root: str | Path, version: int) -> None:
    shutil.rmtree(version_dir(root, version), ignore_errors=True)
