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

Hugging Face: :meth:`MossTokenizer.save_pretrained` writes ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json`` next to the model, so that
``AutoTokenizer.from_pretrained(dir)`` (no ``trust_remote_code``) loads the same tokenizer and
gives the same ids: a BPE model with the same vocabulary, merges ranked by the merged piece's
score (what sentencepiece's BPE encoder does), byte fallback, spaces spelled "▁", and the MOSS
turn tokens and ``"\n"`` as added tokens. One difference is inherent to ``transformers``: it
matches its special tokens (``<s> </s> <pad> <unk>``) in text, sentencepiece does not (a literal
"</s>" in a document stays text here).

Any existing HF tokenizer directory can be used instead: :func:`load_tokenizer` returns an
:class:`HFTokenizer` for it, a wrapper with the same interface, so stages never care which. A MOSS
release's tokenizer (fnlp/moss-moon-003-*: byte-level BPE ``vocab.json`` + ``merges.txt`` and
added tokens, behind custom code that transformers 5 no longer runs) is read from its files into
a standard ``PreTrainedTokenizerFast`` without running that code (:func:`moss_release_tokenizer`).

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

from moss_train.files import sha256_file

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
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
META_FORMAT = "moss-tokenizer"
META_VERSION = 1


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token of `tokenizer` decodes to: its longest piece
    (a piece never decodes to more characters than it is spelled with: "▁" is one space, a
    byte piece "<0xE4>" one byte, a byte-level BPE character one byte)."""
    return max(len(tokenizer.id_to_token(i)) for i in range(tokenizer.vocab_size))


class TokenizerError(RuntimeError):
    """A tokenizer directory is missing, incomplete or inconsistent."""


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

    # --------------------------------------------------------------- HF export
    def save_pretrained(self, directory: str | os.PathLike, extra_config: Mapping | None = None) -> Path:
        """Write this tokenizer to `directory` for both loaders and return the directory.

        ``MossTokenizer.load(directory)`` reads ``tokenizer.model`` (+ meta), and
        ``transformers.AutoTokenizer.from_pretrained(directory)`` reads ``tokenizer.json`` +
        ``tokenizer_config.json`` + ``special_tokens_map.json`` (no custom code). `extra_config`
        entries (e.g. a ``chat_template``) are merged into ``tokenizer_config.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.model_path.resolve() != (directory / MODEL_FILE).resolve():
            _write_atomic(directory / MODEL_FILE, self.model_path.read_bytes())
            meta = dict(self.meta) if self.meta else {"format": META_FORMAT, "format_version": META_VERSION}
            meta.update(hash=self.hash, vocab_size=self.vocab_size, special_ids=self.special_ids)
            _write_atomic(directory / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
        _write_atomic(directory / HF_TOKENIZER_FILE, hf_tokenizer_json(self.model_path.read_bytes()).encode())
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
        config = {
            # The generic fast tokenizer: everything it needs is in tokenizer.json.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "moss_tokenizer_hash": self.hash,
            **dict(extra_config or {}),
        }
        _write_atomic(directory / HF_CONFIG_FILE, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
        _write_atomic(directory / HF_SPECIAL_TOKENS_FILE, (json.dumps(specials, indent=2) + "\n").encode())
        return directory


# ============================================================ sentencepiece -> HF
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED, _SPM_BYTE = 1, 2, 3, 4, 6


def hf_tokenizer_json(model_proto: bytes) -> str:
    """``tokenizer.json`` text of a MOSS sentencepiece BPE model (same ids for the same text).

    sentencepiece's BPE encoder repeatedly merges the adjacent pair whose concatenation is the
    vocabulary piece with the highest score; a HF BPE model merges the pair with the lowest
    merge rank. Listing every split ``(a, b)`` of every piece, ranked by the piece's score,
    makes the two agree. User-defined pieces (turn tokens, ``"\n"``) become added tokens
    matched before the model, as sentencepiece matches them first; a piece spelled with "▁"
    (``<|Inner▁Thoughts|>``) is stored with its space so it matches the raw text.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise TokenizerError("only BPE sentencepiece models convert to tokenizer.json here")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    ids = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    mergeable = {piece for piece, _, kind in pieces if kind in (_SPM_NORMAL, _SPM_BYTE)}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != _SPM_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, ids[left], left, right))
    ranked.sort()
    vocab = {}
    for i, (piece, _, kind) in enumerate(pieces):
        vocab[piece.replace(SPACE_PIECE, " ") if kind == _SPM_USER_DEFINED else piece] = i
    model = models.BPE(
        vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=UNK, byte_fallback=True, fuse_unk=True
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE_PIECE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    added = []
    for piece, _, kind in pieces:
        if kind in (_SPM_CONTROL, _SPM_UNKNOWN):
            added.append(AddedToken(piece, special=True, normalized=False))
        elif kind == _SPM_USER_DEFINED:
            added.append(AddedToken(piece.replace(SPACE_PIECE, " "), special=False, normalized=False))
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    for token in added:  # every added token kept its vocabulary id
        if tokenizer.token_to_id(token.content) != ids.get(sp_piece(token.content), ids.get(token.content)):
            raise TokenizerError(f"tokenizer.json conversion moved the id of {token.content!r}")
    return tokenizer.to_str(pretty=True)


# ============================================================ MOSS release tokenizers
MOSS_RELEASE_CLASS = "MossTokenizer"  # tokenization_moss.py of the fnlp/moss-moon-003-* releases
RELEASE_VOCAB, RELEASE_MERGES, RELEASE_ADDED = "vocab.json", "merges.txt", "added_tokens.json"
# MossTokenizer's defaults where the files name no special token.
RELEASE_SPECIAL_DEFAULTS = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "eos_token": "<eom>",
    "pad_token": None,
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_moss_release_tokenizer(directory: str | os.PathLike) -> bool:
    """A MOSS release's tokenizer layout: vocab.json + merges.txt, no tokenizer.json, and a
    tokenizer_config.json naming the custom MossTokenizer class."""
    directory = Path(directory)
    files = all((directory / f).is_file() for f in (RELEASE_VOCAB, RELEASE_MERGES))
    return (
        files
        and not (directory / HF_TOKENIZER_FILE).is_file()
        and _read_json(directory / HF_CONFIG_FILE).get("tokenizer_class") == MOSS_RELEASE_CLASS
    )


def moss_release_tokenizer(directory: str | os.PathLike):
    """A MOSS release's tokenizer as a standard ``PreTrainedTokenizerFast``, from its files alone
    (none of its code runs), giving the ids its own MossTokenizer gives.

    MossTokenizer is GPT-2's byte-level BPE: the GPT-2 pre-tokenization regex, merges.txt ranked
    by line (its first line, the version header, skipped), no prefix space, nothing added around
    the text. Special tokens (unk / bos / eos / pad, MossTokenizer's defaults where the files name
    none) match as themselves. The added tokens of ``added_tokens.json`` (MOSS's ``<eoh>`` ...
    ``<eom>``) match too and, as transformers 4.25 (the release's version) tokenized them, eat the
    whitespace on both sides; added tokens listed in ``added_tokens_decoder`` (newer
    tokenizer_config.json files) keep their own lstrip / rstrip.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    config = {**_read_json(directory / HF_SPECIAL_TOKENS_FILE), **_read_json(directory / HF_CONFIG_FILE)}
    if config.get("add_prefix_space"):
        raise TokenizerError(f"{directory}: add_prefix_space=true is not supported for a MOSS release tokenizer")
    vocab = json.loads((directory / RELEASE_VOCAB).read_text(encoding="utf-8"))
    lines = (directory / RELEASE_MERGES).read_text(encoding="utf-8").split("\n")[1:-1]  # as MossTokenizer reads it
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(line.split()) for line in lines]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()

    specials = {}
    for key, default in RELEASE_SPECIAL_DEFAULTS.items():
        value = config.get(key, default)
        if value is not None:
            specials[key] = _added_token(value, special=True, strip=False)
    by_content = {token.content: token for token in specials.values()}
    entries = {e["content"]: (int(i), e) for i, e in (config.get("added_tokens_decoder") or {}).items()}
    ids = {content: int(i) for content, i in _read_json(directory / RELEASE_ADDED).items()}
    ids.update({content: i for content, (i, _) in entries.items()})
    for content, _ in sorted(ids.items(), key=lambda item: item[1]):  # in id order: each takes the next id
        if content in by_content:
            token = by_content[content]
        elif content in entries:
            entry = entries[content][1]
            token = _added_token(entry, special=bool(entry.get("special")), strip=False)
        else:  # added_tokens.json: transformers 4.25 stripped the whitespace around these
            token = _added_token(content, special=False, strip=True)
        (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
    tokenizer.add_special_tokens([t for t in specials.values() if t.content not in ids])  # in vocab.json, or new last
    moved = {c: (i, tokenizer.token_to_id(c)) for c, i in ids.items() if tokenizer.token_to_id(c) != i}
    if moved:
        raise TokenizerError(
            f"{directory}: added tokens do not follow vocab.json's ids (token: (file id, id)): "
            f"{dict(list(moved.items())[:5])}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{key: token.content for key, token in specials.items()},
        clean_up_tokenization_spaces=False,
        model_max_length=int(config.get("model_max_length", 2048)),
    )


def _added_token(value, special: bool, strip: bool):
    """An AddedToken from a file's entry (a string, or a dict with content and flags)."""
    from tokenizers import AddedToken

    if isinstance(value, Mapping):
        return AddedToken(
            value["content"],
            lstrip=bool(value.get("lstrip")),
            rstrip=bool(value.get("rstrip")),
            single_word=bool(value.get("single_word")),
            normalized=False,
            special=special,
        )
    return AddedToken(str(value), lstrip=strip, rstrip=strip, normalized=False, special=special)


# ============================================================ any HF tokenizer
HF_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


class HFTokenizer:
    """An existing Hugging Face tokenizer directory behind MossTokenizer's interface.

    Loaded with ``AutoTokenizer.from_pretrained(dir, trust_remote_code=False)`` (a MOSS release's
    tokenizer with :func:`moss_release_tokenizer`, no code run); encoding adds no
    special tokens (like MossTokenizer). The *hash* is the sha256 of the files that define the
    ids (``tokenizer.json``, or the vocabulary files of a slow tokenizer), so shards remember
    which tokenizer made them. The MOSS turn tokens are optional here: ``special_ids`` lists
    those the vocabulary has (a stage that needs them checks).
    """

    def __init__(self, directory: str | os.PathLike):
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        files = [self.directory / f for f in HF_VOCAB_FILES if (self.directory / f).is_file()]
        if not files:
            raise TokenizerError(f"{self.directory}: no tokenizer files ({', '.join(HF_VOCAB_FILES)})")
        release = is_moss_release_tokenizer(self.directory)
        try:
            self.hf = (
                moss_release_tokenizer(self.directory)
                if release
                else AutoTokenizer.from_pretrained(str(self.directory), trust_remote_code=False)
            )
        except TokenizerError:
            raise
        except Exception as e:  # transformers raises many kinds; one message that names the dir
            raise TokenizerError(f"{self.directory}: AutoTokenizer cannot load it: {e}") from e
        if release:  # the added tokens and special tokens decide ids too
            files += [
                self.directory / f
                for f in (RELEASE_ADDED, HF_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE)
                if (self.directory / f).is_file()
            ]
        h = hashlib.sha256()
        for f in files[:1] if files[0].name == HF_TOKENIZER_FILE else files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        self._hash = h.hexdigest()
        if self.hf.eos_token_id is None:
            raise TokenizerError(f"{self.directory}: the tokenizer has no eos token (documents end with it)")
        vocab = self.hf.get_vocab()
        names = [t for t in (self.hf.unk_token, self.hf.bos_token, self.hf.eos_token, self.hf.pad_token) if t]
        self._special_ids = {t: vocab[t] for t in [*names, *MOSS_SPECIAL_TOKENS] if t in vocab}
        self.meta: dict = {}

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def hash(self) -> str:
        return self._hash

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_id(self) -> int:
        """The pad token's id, else eos (padding positions never carry a label)."""
        return int(self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id)

    @property
    def unk_id(self) -> int | None:
        return self.hf.unk_token_id

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    def token_to_id(self, piece: str) -> int:
        i = self.hf.get_vocab().get(piece)
        if i is None:
            raise KeyError(piece)
        return i

    def id_to_token(self, i: int) -> str:
        return self.hf.convert_ids_to_tokens(int(i))

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Fast tokenizers encode a batch in Rust threads (TOKENIZERS_PARALLELISM decides)."""
        return self.hf(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def tokens(self, text: str) -> list[str]:
        return self.hf.tokenize(text)

    def save_pretrained(self, directory: str | os.PathLike, extra_config: Mapping | None = None) -> Path:
        """The HF tokenizer's own files, with `extra_config` merged into tokenizer_config.json."""
        directory = Path(directory)
        self.hf.save_pretrained(str(directory))
        if extra_config:
            config_path = directory / HF_CONFIG_FILE
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config.update(extra_config)
            _write_atomic(config_path, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
        return directory

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]}, path={self.directory})"


def load_tokenizer(directory: str | os.PathLike) -> MossTokenizer | HFTokenizer:
    """The tokenizer in `directory`: MossTokenizer when it holds a MOSS sentencepiece model
    (``tokenizer.model`` + ``tokenizer_meta.json``), else any HF tokenizer (:class:`HFTokenizer`)."""
    directory = Path(directory)
    if (directory / MODEL_FILE).is_file() and (directory / META_FILE).is_file():
        return MossTokenizer.load(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: no tokenizer directory")
    return HFTokenizer(directory)


def tokenizer_is_complete(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a model and a meta that vouches for it (hash matches)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        return meta.get("hash") == sha256_file(directory / MODEL_FILE)
    except (OSError, ValueError):
        return False
