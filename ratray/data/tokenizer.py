"""Tokenizers of the chunk store: a reversible byte-level BPE (RETRO) and a fixed BERT WordPiece (REALM).

`LMTokenizer` (kind "bpe") is the LM tokenizer: a reversible byte-level BPE (HF `tokenizers`), with
exact byte accounting.

Byte-level means every UTF-8 byte of the input is first mapped to one of 256 printable stand-in
characters, and BPE merges run over those; there is no normalizer and no prefix space, so
`decode(encode(s)) == s` for every string (tabs, runs of spaces, CRLF, any unicode).

Special tokens `<|endoftext|>` and `<|pad|>` exist in the vocabulary but are never produced by
`encode`: text that happens to contain the literal string "<|endoftext|>" encodes as ordinary bytes
(so it round-trips). Callers add `eot_id` / `pad_id` themselves. Special tokens stand for zero bytes
and decode to nothing.

`token_bytes(ids)` gives the exact bytes a sequence of ids stands for, even when the sequence starts
or ends in the middle of a multi-byte character (as a chunk boundary may): bits-per-byte is computed
from these counts, never from decoded text.

`WordPieceTokenizer` (kind "wordpiece") is the shipped, untrained BERT WordPiece (30,522 ids,
lowercasing, accents stripped) of a sentence-BERT model folder, loaded offline from its
`tokenizer.json` with padding and truncation (128 as shipped) switched off. It is lossy (`decode`
gives lowercased wordpieces), so callers keep the original text through the character offsets of
`encode_batch_offsets`. `encode*` never add [CLS]/[SEP], and text containing a literal "[MASK]" (or
any other special token) encodes as ordinary text, never as the special id.

`load_tokenizer(path, kind)` opens either kind from a saved `tokenizer.json`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ratray.pretrained import model_path

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)


# ---------------------------------------------------------------------------------------------
# the byte ↔ stand-in character map of byte-level BPE


def _byte_stand_ins() -> dict[str, int]:
    """stand-in character → byte. Printable Latin-1 bytes stand for themselves; the other 68 bytes
    (controls, space, NBSP, soft hyphen) are shifted to code points 256, 257, ... in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in keep}
    shifted = (b for b in range(256) if b not in set(keep))
    for i, b in enumerate(shifted):
        out[chr(256 + i)] = b
    return out


_STAND_IN_TO_BYTE = _byte_stand_ins()


# ---------------------------------------------------------------------------------------------
# the tokenizer


class _TokenizerFile:
    """Saving and loading a `tokenizers.Tokenizer` JSON file (shared by both tokenizers)."""

    _tok: Tokenizer

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(Tokenizer.from_file(str(path)))


class LMTokenizer(_TokenizerFile):
    """Byte-level BPE for language modelling. Build with `train` or `load`."""

    kind = "bpe"

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        self.eot_id, self.pad_id = ids
        tok.encode_special_tokens = True  # literal "<|endoftext|>" in text is just text
        self._table = self._byte_table()
        self.byte_lengths = np.array([len(b) for b in self._table], dtype=np.int32)  # id → #bytes

    def _byte_table(self) -> list[bytes]:
        """id → the exact bytes the token stands for (b"" for special tokens)."""
        n = self._tok.get_vocab_size(with_added_tokens=True)
        table: list[bytes] = [b""] * n
        special = set(SPECIAL_TOKENS)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            try:
                table[i] = bytes(_STAND_IN_TO_BYTE[c] for c in token)
            except KeyError:
                raise ValueError(f"token {i} ({token!r}) is not byte-level: "
                                 f"not an LMTokenizer file") from None
        return table

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> LMTokenizer:
        """Train on `texts` (the training split only). The full 256-byte alphabet is always in the
        vocabulary, so any text encodes; the result may be smaller than `vocab_size` on tiny data."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    # -- using ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._table)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (multi-threaded in Rust, no offsets computed)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters become U+FFFD.

        Decodes through the byte table (same result as the HF ByteLevel decoder, several times
        faster, and consistent with `token_bytes` by construction).
        """
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def token_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact UTF-8 bytes `ids` stand for (possibly a partial character at either end)."""
        table = self._table
        return b"".join([table[i] for i in ids])

    def n_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
        """len(token_bytes(ids)), without building the bytes."""
        return int(self.byte_lengths[np.asarray(ids, dtype=np.int64)].sum())

    def __repr__(self) -> str:
        return f"LMTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id})"


# ---------------------------------------------------------------------------------------------
# BERT WordPiece (REALM)

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece_file(model: str) -> Path:
    """The `tokenizer.json` shipped with embedding model `model` (never downloaded)."""
    path = model_path(model) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"model {model!r} has no tokenizer.json at {path}")
    return path


class WordPieceTokenizer(_TokenizerFile):
    """A fixed BERT WordPiece (lowercasing). Build with `from_model` or `load`; never trained."""

    kind = "wordpiece"

    def __init__(self, tok: Tokenizer):
        ids = [tok.token_to_id(s) for s in WORDPIECE_SPECIALS]
        if None in ids:
            raise ValueError(f"tokenizer lacks the BERT special tokens {WORDPIECE_SPECIALS}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True  # a literal "[MASK]" in text is just text
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self.is_subword = np.zeros(self._vocab_size, dtype=bool)  # (V,) True for "##" continuations
        self.is_subword[[i for t, i in vocab.items() if t.startswith("##")]] = True

    @classmethod
    def from_model(cls, model: str) -> WordPieceTokenizer:
        """The tokenizer shipped with embedding model `model` (see `ratray.pretrained.model_path`)."""
        return cls.load(wordpiece_file(model))

    # -- using ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> tuple[int, ...]:
        """pad, unk, cls, sep, mask: ids never masked and never drawn as random replacements."""
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def encode(self, text: str) -> list[int]:
        """Wordpiece ids of `text`, without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (multi-threaded in Rust, no offsets computed)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_batch_offsets(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: (ids int32 (n,), offsets int64 (n, 2)) — each token's [start, end) character
        span in the ORIGINAL text (Python string indices; starts and ends non-decreasing)."""
        out = []
        for e in self._tok.encode_batch(list(texts), add_special_tokens=False):
            ids = np.asarray(e.ids, dtype=np.int32)
            offsets = np.asarray(e.offsets, dtype=np.int64).reshape(len(ids), 2)
            out.append((ids, offsets))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Lowercased text of `ids` (wordpieces joined; special tokens kept as "[MASK]" etc.)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
                f"cls_id={self.cls_id}, sep_id={self.sep_id}, mask_id={self.mask_id})")


TOKENIZER_KINDS = {"bpe": LMTokenizer, "wordpiece": WordPieceTokenizer}


def load_tokenizer(path: str | Path, kind: str = "bpe") -> LMTokenizer | WordPieceTokenizer:
    """Open a saved `tokenizer.json` of the given kind ("bpe" | "wordpiece")."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r} (known: {', '.join(TOKENIZER_KINDS)})")
    return TOKENIZER_KINDS[kind].load(path)
