"""What a person sees in the MLflow UI (3.17) for a ratray run, and why; used by ratray/tracking.py.
Checked in a real browser: cluster/uicheck.py (`make ui-check`, tests/test_mlflow_ui.py).

    Tracker.start ─► typed_experiment: experiment tagged mlflow.experimentKind=custom_model_development
    worker, every log step ─► metrics + headline(metrics)  (loss, *bpb* again under headline/)
    Tracker.end ─► describe_run: tag mlflow.note.content = Markdown (headline figures, every PNG
                   artifact as an image from the UI's get-artifact); again after later artifacts
    run links     ─► run_url: the run's Model metrics tab, ?workflowType=machine_learning

- Experiment kind: the tag is set when ratray creates the experiment, or finds it without one (a
  kind someone picked in the UI is kept; the UI writes the same tag). The 3.17 UI itself shows
  the kind of its GenAI / Model training switch: the URL's ``?workflowType=machine_learning``,
  else the browser's last choice (GenAI at first). So the links ratray builds carry it.
- Charts first: the run page's "Model metrics" tab draws one section per metric-name prefix ("a/b"
  goes to section "a"), prefixed sections above the unprefixed "Model metrics", charts
  alphabetical. Copies under ``headline/`` make loss and bits-per-byte (REALM: held-out accuracy
  and exact match, with retrieval and null-only) the first row; the plain names stay what every
  reader of the run uses.
- Plots: the run's Overview shows its description (Markdown, images allowed): the headline
  figures, then the loss plot, the method's plots and the evaluation report's (``eval/``).
- Datasets: :meth:`ratray.tracking.Tracker.log_dataset`, the corpus as a run input with context
  ``training`` (the Overview's "Datasets").
"""
from __future__ import annotations

from typing import Any, Mapping

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow UI
MODEL_TRAINING = "custom_model_development"  # the UI's "Machine learning" / model training kind
ML_WORKFLOW = "workflowType=machine_learning"  # the 3.17 UI's Model training view (URL query)
NOTE_TAG = "mlflow.note.content"  # a run's description (Markdown) on its Overview
HEADLINE = "headline/"  # the first section of the run's metric charts
MAX_NOTE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH


# besides every *bpb* metric: the losses, and REALM's held-out accuracy and span exact match with
# retrieval and with the null document only (its counterpart of RETRO[ON] / RETRO[OFF] bpb)
HEADLINE_KEYS = ("loss", "val_loss", "val_acc_retrieval", "val_acc_null", "val_exact_retrieval",
                 "val_exact_null")


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The losses, bits-per-byte and REALM's held-out accuracies again under ``headline/`` (their
    chart section comes first)."""
    return {HEADLINE + k: v for k, v in metrics.items()
            if (k in HEADLINE_KEYS or "bpb" in k) and "/" not in k}


def run_url(base: str, experiment_id: str, run_id: str, tab: str = "model-metrics") -> str:
    """The run's page in the UI at `base` (tab: "" Overview, model-metrics, system-metrics, artifacts)
    in the Model training view."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/{tab}?{ML_WORKFLOW}" if tab else f"{page}?{ML_WORKFLOW}"


def typed_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created if missing; tagged as model training unless it has a kind."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except Exception:  # created concurrently by another process: use theirs
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def png_artifacts(client, run_id: str) -> list[str]:
    """The run's PNG artifacts at the top level and one folder down, top level first."""
    top = client.list_artifacts(run_id)
    found = [a.path for a in top if not a.is_dir and a.path.endswith(".png")]
    for d in (a for a in top if a.is_dir):
        found += [a.path for a in client.list_artifacts(run_id, d.path)
                  if not a.is_dir and a.path.endswith(".png")]
    return found


def describe_run(client, run_id: str) -> str:
    """Write the run's description (Markdown on its Overview): the headline metrics' last values and
    every PNG artifact as an image, top level first; returns the Markdown."""
    from urllib.parse import quote

    run = client.get_run(run_id)
    heads = {k[len(HEADLINE):]: v for k, v in sorted(run.data.metrics.items()) if k.startswith(HEADLINE)}
    lines = [f"**{run.info.run_name}** · " + " · ".join(f"{k} **{v:.4f}**" for k, v in heads.items())
             if heads else f"**{run.info.run_name}**", ""]
    for path in png_artifacts(client, run_id):
        lines += [f"![{path}](get-artifact?path={quote(path, safe='')}&run_uuid={run_id})", ""]
    note = "\n".join(lines)
    client.set_tag(run_id, NOTE_TAG, note[:MAX_NOTE])
    return note


def store_dataset(path) -> dict:
    """A chunk store as :meth:`ratray.tracking.Tracker.log_dataset`'s arguments: name
    ``<corpus>/<tokenizer>-<chunk tokens>``, digest = the store's content key (sha256 of the corpus
    fingerprint and settings; with live appends or removals, of the key and the update log), the
    counts as the profile, the store's folder as the source."""
    import hashlib
    import json
    from pathlib import Path

    from ratray.data.store import ChunkStore

    store = ChunkStore.open(path)
    meta, log = store.meta, store.log
    corpus = meta["settings"]["corpus"].get("path")
    ch = meta["settings"]["chunks"]
    key = meta["key"]
    if log["parts"] or log["tombstones"]:
        changes = json.dumps({"parts": log["parts"], "tombstones": log["tombstones"]}, sort_keys=True)
        key = hashlib.sha256((key + changes).encode()).hexdigest()
    counts = meta["counts"]
    profile = {"num_rows": len(store), "chunks": counts["chunks"], "documents": counts["documents"],
               "tokens": counts["tokens"], "bytes": counts["bytes"],
               "appended_parts": len(log["parts"]), "removed_chunks": int(len(store.removed_ids()))}
    return {"name": f"{Path(corpus).name if corpus else 'stdlib'}/{ch['tokenizer']}-{ch['chunk_tokens']}",
            "digest": key[:16], "source": str(Path(path).resolve()), "profile": profile}
