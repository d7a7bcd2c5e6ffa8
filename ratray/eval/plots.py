"""The evaluation report's plots (PNG): bpb against model size, bpb(α), bpb against database size.
Every point carries its 95% interval as an error bar."""
from __future__ import annotations

from pathlib import Path


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str = "bits per byte") -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _errors(rows: list[dict]) -> list[list[float]]:
    return [[r["bpb"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["bpb"] for r in rows]]


def bpb_vs_params(rows: list[dict], path: Path, title: str) -> Path:
    """One point per (model, retrieval) row: bpb against non-embedding parameters (log x)."""
    plt, fig, ax = _figure()
    for retrieval, marker in (("none", "s"), ("off", "v"), ("on", "o")):
        sel = [r for r in rows if r["retrieval"] == retrieval]
        if sel:
            ax.errorbar([r["non_embedding_params"] for r in sel], [r["bpb"] for r in sel],
                        yerr=_errors(sel), fmt=marker, capsize=3, label=f"retrieval {retrieval}")
            for r in sel:
                ax.annotate(r["model"], (r["non_embedding_params"], r["bpb"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    return _save(plt, fig, ax, path, title, "non-embedding parameters")


def bpb_by_overlap(rows: list[dict], path: Path, title: str) -> Path:
    """bpb(α) of every row: the chunks whose overlap with their neighbours is at most α."""
    plt, fig, ax = _figure()
    for r in rows:
        pts = [p for p in r["by_overlap"] if p["chunks"] > 0]
        ax.errorbar([p["alpha"] for p in pts], [p["bpb"] for p in pts], yerr=_errors(pts),
                    marker="o", capsize=3, label=r["model"])
    return _save(plt, fig, ax, path, title, "α: max longest common run ÷ chunk length (r(C) ≤ α)")


def bpb_vs_database(points: list[dict], path: Path, title: str) -> Path:
    """RETRO[ON] with the database restricted to a share of its documents."""
    plt, fig, ax = _figure()
    ax.errorbar([p["documents_share"] for p in points], [p["bpb"] for p in points],
                yerr=_errors(points), marker="o", capsize=3, label="RETRO[ON], same checkpoint")
    ax.set_xscale("log")
    return _save(plt, fig, ax, path, title, "share of the database's documents kept")
