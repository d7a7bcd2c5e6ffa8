"""What makes a checkpoint safe and right to resume from, checked before DeepSpeed reads a byte.

DeepSpeed loads its files with `torch.load(weights_only=False)`: a pickle planted in a checkpoint
folder (a shared, writable volume) would run code on resume. So at save time every rank writes a
manifest beside its DeepSpeed files:

    ratray-manifest.rank<r>.json   {"meta": {world_size, micro_batch, grad_accum, model},
                                    "files": {relative path: sha256}}

and before a resume (`verify`) the folder must hold a manifest per rank of the saving run, every
file of the DeepSpeed tag folder must be listed with its digest (a torn, swapped or extra file is
refused), the run must match the saving run (world size, micro-batch, grad_accum: the data
position is a function of them; the model config: DeepSpeed would fail deep inside with a shape
error), and every listed pickle must load under torch's `weights_only` unpickler (tensors, plain
containers and the three DeepSpeed classes its optimizer states hold). The digest catches
accidents; the weights_only pass is what refuses code, even from someone who rewrote the manifest.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

CKPT_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray Train checkpoint folder
MANIFEST = "ratray-manifest.rank{rank}.json"
RESUME_KEYS = {"world_size": "train.num_workers", "micro_batch": "train.micro_batch",
               "grad_accum": "train.grad_accum"}
# what DeepSpeed's ZeRO optimizer states pickle besides tensors (stages 1-3, fp32 and bf16)
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed: tampered with, torn, or saved by another setup."""


def run_meta(world_size: int, micro_batch: int, grad_accum: int, model: dict) -> dict:
    """What a resume must match (JSON-normalised: tuples become lists, as they read back)."""
    return json.loads(json.dumps({"world_size": world_size, "micro_batch": micro_batch,
                                  "grad_accum": grad_accum, "model": model}))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(folder: str | Path, rank: int, meta: dict) -> Path:
    """After `engine.save_checkpoint(folder)` on this rank: the manifest of the files it wrote."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith("ratray-manifest.")}
    out = folder / MANIFEST.format(rank=rank)
    out.write_text(json.dumps({"meta": meta, "files": files}, indent=1))
    return out


def _manifests(folder: Path) -> tuple[dict, dict]:
    """(the saving run's meta, every listed file -> digest) from the manifests of all its ranks."""
    found = sorted(folder.glob(MANIFEST.format(rank="*")))
    if not found:
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST.format(rank='*')} (saved by an "
                              "older ratray, or not by ratray): refusing to unpickle its files")
    metas, files = [], {}
    for p in found:
        try:
            m = json.loads(p.read_text())
            metas.append(m["meta"])
            files.update(m["files"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint manifest {p} is unreadable: {e}") from None
    outside = [r for r in files if Path(r).is_absolute() or ".." in Path(r).parts]
    if outside:
        raise CheckpointError(f"checkpoint {folder}: its manifest lists {outside[0]}, outside "
                              "the checkpoint folder: refusing it")
    meta = metas[0]
    if any(m != meta for m in metas):
        raise CheckpointError(f"checkpoint {folder}: the ranks' manifests disagree on the run")
    if len(found) != meta.get("world_size"):
        raise CheckpointError(f"checkpoint {folder}: {len(found)} rank manifests for a run of "
                              f"{meta.get('world_size')} workers (an incomplete checkpoint)")
    return meta, files


def _check_files(folder: Path, files: dict) -> None:
    tag = folder / CKPT_TAG
    present = {p.relative_to(folder).as_posix() for p in tag.rglob("*") if p.is_file()}
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(f"checkpoint {folder}: {extra[0]} is not in its manifest (planted "
                              f"after the save?): refusing to load it")
    for rel, digest in sorted(files.items()):
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder}: {rel} is missing")
        if sha256(p) != digest:
            raise CheckpointError(f"checkpoint {folder}: {rel} changed since it was saved "
                                  "(sha256 differs from its manifest): refusing to load it")


def _check_run(folder: Path, saved: dict, now: dict) -> None:
    for key, cfg_key in RESUME_KEYS.items():
        if saved.get(key) != now[key]:
            raise CheckpointError(
                f"checkpoint {folder} was saved with {cfg_key}={saved.get(key)}, this run has "
                f"{cfg_key}={now[key]}: resuming would shift the data position; use "
                f"{cfg_key}={saved.get(key)} or another train.run_name")
    old, new = saved.get("model") or {}, now["model"]
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"model.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise CheckpointError(f"checkpoint {folder} was saved with another model config ({shown}): "
                              "resume it with its config or pick another train.run_name")


def check_pickles(folder: Path, rels) -> None:
    """Load every listed `.pt` file with torch's weights_only unpickler (memory-mapped: tensors
    are not read): a file that would call anything else is refused, and nothing in it runs."""
    import torch

    allowed = [_import(name) for name in DEEPSPEED_GLOBALS]
    for rel in sorted(rels):
        if not rel.endswith(".pt"):
            continue
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(folder / rel, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # UnpicklingError, or not a torch zip file at all
            called = re.search(r"GLOBAL ([\w.]+)", str(e))
            cause = f"unpickling it would call {called.group(1)}" if called else \
                " ".join(str(e).split())[:160]
            raise CheckpointError(f"checkpoint {folder}: {rel} is not a plain tensor checkpoint "
                                  f"({cause}): refusing to load it") from None


def _import(dotted: str):
    import importlib

    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def verify(folder: str | Path, now: dict | None = None) -> dict:
    """Raise CheckpointError unless `folder` is safe to hand to DeepSpeed and (with `now`, this
    run's `run_meta`) matches this run; returns the saving run's meta."""
    folder = Path(folder)
    saved, files = _manifests(folder)
    _check_files(folder, files)
    if now is not None:
        _check_run(folder, saved, now)
    check_pickles(folder, files)
    return saved


def latest_checkpoint(run_root: str | Path) -> Path | None:
    """The newest checkpoint folder of a Ray Train run (`checkpoint_<timestamp>`: by name = by
    time), or None."""
    found = sorted(p for p in Path(run_root).glob("checkpoint_*") if p.is_dir())
    return found[-1] if found else None


def check_resume(run_root: str | Path, now: dict) -> None:
    """Driver side, before any worker starts: a run that would resume from its newest checkpoint
    must match it (manifests only: the workers `verify` the files themselves). Refusing here
    fails once, clearly, where a worker's refusal would be retried `train.max_failures` times."""
    ckpt = latest_checkpoint(run_root)
    if ckpt is not None:
        _check_run(ckpt, _manifests(ckpt)[0], now)
