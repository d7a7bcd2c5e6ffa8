"""What corpus reading produces: documents, the skip report, and the error for a bad corpus.

Kept apart from the readers (ratray/data/readers.py) and the corpus walk (ratray/data/corpus.py,
which re-exports these names) so that both can use them without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_EXAMPLES = 5  # locations kept per skip reason


class CorpusError(ValueError):
    """The corpus cannot be read as configured; the message names the file, row and field."""


@dataclass(frozen=True)
class Document:
    doc_id: str  # unique across the corpus
    text: str  # non-empty, valid UTF-8 when encoded
    title: str | None
    # "path" for a text file or a one-object JSON file, "path:row" for JSONL (1-based line) /
    # Parquet (0-based row), "path[i]" for item i (0-based) of a JSON array
    source: str


@dataclass
class SkipReport:
    """Documents dropped while reading, by reason, plus what was read and whether a cap stopped it.

    `capped` is not a skip: it names the cap ("max_docs" / "max_bytes") that stopped reading early,
    or is None when the whole corpus was read.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    capped: str | None = None
    documents: int = 0  # documents yielded
    bytes: int = 0  # UTF-8 bytes of the documents yielded

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipReport) -> SkipReport:
        """Add `other`'s counts and stats into this report (in place); returns self."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(ex)])
        self.capped = self.capped or other.capped
        self.documents += other.documents
        self.bytes += other.bytes
        return self

    def as_dict(self) -> dict:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())},
                "capped": self.capped, "documents": self.documents, "bytes": self.bytes}
