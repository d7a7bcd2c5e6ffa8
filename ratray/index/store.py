"""The index on disk: the one owner of its format (shard files, manifest, versions/, CURRENT).

A plain index folder holds `shard_{i}.faiss` (plain `faiss.write_index`), `shard_{i}.ids.npy`
(int64 chunk id of every row of that shard) and `manifest.json` (written last). A versioned root
(REALM's refreshed index, a live database) holds `versions/v000001/`, `versions/v000002/`, ...
(each a plain index folder) and `CURRENT`, the relative path of the serving one, rewritten
atomically. Folders are written under a temporary name and renamed into place, never half-written;
a plain folder rebuilt in place gets the next version number (shards can tell old from new).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from ratray.config import ConfigError
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




class EmbeddingModelMismatch(ConfigError):
    """The index was built with another embedding model than the configured one."""


def check_embedding_model(index_dir: str | Path, model: str, rebuild_ok: bool = False) -> None:
    """Refuse an index built by another embedding model than `model` (a `model_id`: name-digest),
    naming both: its vectors and the config's queries would not be comparable (with the same
    dimension: silently wrong). `rebuild_ok` (a build about to rebuild the index): the same model
    whose weights changed in place is fine. No index there: nothing to check."""
    try:
        m = load_manifest(serving_dir(index_dir))
    except (IndexBuildError, FileNotFoundError):
        return
    have = m.embedding_model
    same_name = have.rsplit("-", 1)[0] == model.rsplit("-", 1)[0]
    if have != model and not (rebuild_ok and same_name):
        raise EmbeddingModelMismatch(
            f"index {index_dir} was built with embedding model {have!r} ({m.dim}-d); the config's "
            f"embed.model is {model!r}: use another workdir, or remove {index_dir} and build again")


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
    atomic_write_text(Path(index_dir) / MANIFEST, manifest.to_json())


def atomic_write_text(path: Path, text: str) -> None:
    """`path` holds the old text or the new, never a torn mix: a unique temp file, flushed to disk
    before the rename (a crash right after a bare rename can leave an empty file on ext4/xfs)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, EXCHANGE
    except (OSError, AttributeError):  # no renameat2 in this libc
        return False
    return rc == 0


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp` (never a half-written index). Where the OS can, in one atomic
    exchange: a shard restarting meanwhile finds the old index or the new one, never no index."""
    old = None
    if out_dir.exists():
        if not out_dir.is_dir():
            raise IndexBuildError(f"{out_dir} exists and is not a directory")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        if _exchange(tmp, out_dir):
            os.rename(tmp, old)  # tmp now holds the previous index
        else:
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
    else:
        os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def next_version(out_dir: str | Path) -> int:
    """The version a rebuild of `out_dir` in place gets: one above any there (its own manifest's,
    and every version a live update published under it; 1 if none), so shards restarted under a
    running service can tell the new index from the old."""
    try:
        own = int(load_manifest(out_dir).version)
    except (IndexBuildError, ValueError, TypeError):
        own = 0
    return max([own, *versions_on_disk(out_dir)]) + 1



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
    atomic_write_text(root / CURRENT, rel + "\n")


def current_version(root: str | Path) -> int | None:
    """The version root/CURRENT names (None: no CURRENT, or it names no `versions/vNNNNNN`)."""
    cur = Path(root) / CURRENT
    if not cur.is_file():
        return None
    name = Path(cur.read_text().strip()).name
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def remove_leftovers(root: str | Path) -> list[str]:
    """Remove what crashed writers left under a versioned root: half-built `versions/.vN.tmp-*`,
    `.vN.old-*` folders and temp files of CURRENT. Only for the root's one writer (the refresh
    service, at start): a live writer's temp folder would go too. Returns the names removed."""
    root = Path(root)
    removed = []
    for d in (root, root / VERSIONS):
        for p in sorted(d.glob(".*")) if d.is_dir() else []:
            if ".tmp-" in p.name or ".old-" in p.name:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(root)))
    return removed


def remove_version(root: str | Path, version: int) -> None:
    """Delete a version's folder; never the one CURRENT names (a restarted shard loads that one)."""
    if current_version(root) == int(version):
        raise ValueError(f"{version_dir(root, version)} is named by {Path(root) / CURRENT}: not removed")
    shutil.rmtree(version_dir(root, version), ignore_errors=True)


def republish_version(root: str | Path, version: int, new_version: int) -> Path:
    """`version`'s index again, under the higher number `new_version` (its files hard-linked, its
    manifest renumbered and marked `republished_from`): how a resumed run serves the index of
    its checkpoint's weights while version numbers only ever grow."""
    src, dst = version_dir(root, version), version_dir(root, new_version)
    if new_version <= max(versions_on_disk(root), default=0):
        raise ValueError(f"republish as v{new_version}: not above every version under {root}")
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp, copy_function=os.link)
    m = load_manifest(tmp)
    (tmp / MANIFEST).unlink()  # a hard link to the source's manifest: write a new file instead
    write_manifest(tmp, replace(m, version=int(new_version),
                                            extra={**m.extra, "republished_from": int(version)}))
    os.rename(tmp, dst)
    return dst

