"""The MOSS tokenizer: a sentencepiece BPE model over English, Chinese and code.

One tokenizer directory holds:

- ``tokenizer.model``      the sentencepiece model (its sha256 is the *tokenizer hash*,
                           written into every token shard so data and tokenizer cannot drift);
- ``tokenizer_meta.json``  special token ids, vocab size, the hash, and how it was trained.

Encoding is exact and reversible: ``decode(encode(text)) == text`` for any text, including
indentation, tabs, blank lines and CJK (identity normalisation, no extra-whitespace removal, no
dummy prefix, byte fallback for anything outside the vocabulary, and ``"\\n"`` as a dedicated
piece). The one exception is the literal character U+2581 ("▁"), which sentencepiece uses to
spell spaces and therefore decodes as a space.

``encode`` never adds ``<s>``/``</s>``: callers decide (the corpus tokenizer appends ``</s>``
after each document). The MOSS turn markers (``<|Human|>`` ... ``<eom>``) are user-defined
pieces, so each one in a text encodes to exactly one id.

Training is offline work and lives in ``data_pipelines/train_tokenizer.py``; this module is
what training and inference load at run time (it needs no torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

MOSS_SPECIAL_TOKENS = [
    "<|Human|>",
    "<|Inner Thoughts|>",
    "<|Commands|>",
    "<|Results|>",
    "<|MOSS|>",
    "<eoh>",
    "<eot>",
    "<eoc>",
    "<eor>",
    "<eom>",
]
# Pieces with fixed ids 0..3 (sentencepiece meta pieces).
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# "\n" is a user-defined piece: sentencepiece otherwise cannot learn pieces for it, and code
# has one per line; as its own id it costs one token and round-trips exactly.
NEWLINE = "\n"
# sentencepiece spells a space as U+2581 ("▁") before it matches pieces, so a special token that
# contains a space ("<|Inner Thoughts|>") is stored with "▁" in its place; it then matches the
# text form and decodes back to it.
SPACE_PIECE = "\u2581"


def sp_piece(token: str) -> str:
    """The sentencepiece piece that spells `token` (spaces as U+2581)."""
    return token.replace(" ", SPACE_PIECE)

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
META_FILE = "tokenizer_meta.json"
META_FORMAT = "moss-tokenizer"
META_VERSION = 1


class TokenizerError(RuntimeError):
    """A tokenizer directory is missing, incomplete or inconsistent."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


class MossTokenizer:
    """Thin, fast wrapper over a sentencepiece model with the MOSS special tokens."""

    def __init__(self, model_path: str | os.PathLike, meta: Mapping | None = None):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise TokenizerError(f"{model_path}: tokenizer model not found")
        proto = model_path.read_bytes()
        self._hash = hashlib.sha256(proto).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.model_path = model_path
        self.meta = dict(meta or {})
        if self.meta.get("hash") not in (None, self._hash):
            raise TokenizerError(
                f"{model_path}: sha256 {self._hash} does not match {META_FILE} "
                f"({self.meta['hash']}); the directory mixes two tokenizers, retrain or recopy it"
            )
        missing = [t for t in MOSS_SPECIAL_TOKENS if self.sp.piece_to_id(sp_piece(t)) == self.sp.unk_id()]
        if missing:
            raise TokenizerError(f"{model_path}: special tokens missing from the vocabulary: {missing}")
        self._special_ids = {t: self.sp.piece_to_id(sp_piece(t)) for t in [UNK, BOS, EOS, PAD, *MOSS_SPECIAL_TOKENS]}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, directory: str | os.PathLike) -> MossTokenizer:
        directory = Path(directory)
        meta_path = directory / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        return cls(directory / MODEL_FILE, meta)

    # --------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def hash(self) -> str:
        """sha256 (hex) of tokenizer.model: the identity of this tokenizer."""
        return self._hash

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def special_ids(self) -> dict[str, int]:
        """Piece -> id for <unk>, <s>, </s>, <pad> and the MOSS turn tokens."""
        return dict(self._special_ids)

    def token_to_id(self, piece: str) -> int:
        """Id of a piece (spaces may be written as spaces or as "▁"); KeyError if unknown."""
        i = self.sp.piece_to_id(sp_piece(piece))
        if i == self.sp.unk_id() and piece != UNK:
            raise KeyError(piece)
        return i

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # ------------------------------------------------------------------ coding
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no <s>/</s> added); special tokens map to their single ids."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once in sentencepiece's C++ thread pool (-1: all cores)."""
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Control pieces (<s>, </s>, <pad>) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def tokens(self, text: str) -> list[str]:
        """Pieces of `text`, for inspection."""
        return self.sp.encode(text, out_type=str)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"MossTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]}, path={self.model_path})"


def tokenizer_is_complete(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a model and a meta that vouches for it (hash matches)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        return meta.get("hash") == sha256_file(directory / MODEL_FILE)
    except (OSError, ValueError):
        return False
