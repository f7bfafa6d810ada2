"""Cleaning rules for one source, applied to every document before tokenization.

In order, each rule counted when it fires:

1. Unicode normalisation (NFC by default; ``unicode_normalized`` counts changed documents);
2. control characters removed: C0/C1 controls except tab, newline and carriage return, and lone
   surrogates (JSON can carry them; they are not encodable text) — ``control_chars_removed``;
3. prose only (en, zh): outer whitespace stripped and runs of 3+ newlines cut to 2 —
   ``whitespace_normalized``. Code keeps every whitespace character as it is;
4. filters that reject (the reason is the rule's name): ``empty_after_cleaning``,
   ``whitespace_only`` (every language: code and ``any`` keep whitespace, so nothing else
   catches it), ``too_short`` / ``too_long`` (characters), ``low_alnum_ratio`` (letters and
   digits among non-space characters: catches binary junk and symbol soup), ``long_lines`` (code: mean line
   length, catches minified or generated files), and the language check ``wrong_language``:
   for zh the share of CJK ideographs among letters, for en the share of Latin letters.
   Ratios look at the first ``PROBE_CHARS`` characters (cheap on huge documents);
5. exact de-duplication by a 64-bit hash of the cleaned text (``content_hash``), decided by the
   caller in input order (the first copy is kept; the others are rejected as ``duplicate``).

Per-language defaults are in ``LANG_DEFAULTS``; every field can be overridden.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, replace

import numpy as np

PROBE_CHARS = 20_000
NORMALIZATIONS = ("NFC", "NFKC", "none")

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_MANY_NEWLINES = re.compile(r"\n{3,}")

# Character classes as bits of a per-code-point table (numpy look-ups are ~50x faster than
# regular expressions over Unicode classes, which matters at corpus scale).
SPACE, ALNUM, LETTER, LATIN, CJK = 1, 2, 4, 8, 16
_CJK_RANGES = ((0x3400, 0x4DC0), (0x4E00, 0xA000), (0xF900, 0xFB00), (0x20000, 0x30000))
_TABLE: np.ndarray | None = None


def char_classes() -> np.ndarray:
    """uint8 class bits for every BMP code point (built once per process, ~0.3 s)."""
    global _TABLE
    if _TABLE is None:
        chars = [chr(c) for c in range(0x10000)]
        table = np.zeros(0x10000, dtype=np.uint8)
        table[[c.isspace() for c in chars]] |= SPACE
        table[[c.isalnum() and c != "_" for c in chars]] |= ALNUM
        table[[c.isalpha() for c in chars]] |= LETTER
        latin = np.zeros(0x10000, dtype=bool)
        latin[ord("A") : ord("Z") + 1] = latin[ord("a") : ord("z") + 1] = latin[0xC0:0x250] = True
        table[latin & (table & LETTER > 0)] |= LATIN
        for lo, hi in _CJK_RANGES[:3]:
            table[lo:hi] |= CJK
        _TABLE = table
    return _TABLE


_BITS = (SPACE, ALNUM, LETTER, LATIN, CJK)
_BITS_OF_CLASS = np.array([[int(bool(v & bit)) for bit in _BITS] for v in range(32)], dtype=np.int64)
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_ALNUM = bytes(c for c in range(128) if chr(c).isalnum())
_ASCII_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())


def class_counts(text: str) -> dict[int, int]:
    """How many characters of `text` have each class bit (astral CJK counts as CJK letters)."""
    if text.isascii():  # most English and code: byte deletes in C, no table
        b = text.encode("ascii")
        letters = len(b) - len(b.translate(None, _ASCII_LETTERS))
        return {
            SPACE: len(b) - len(b.translate(None, _ASCII_SPACE)),
            ALNUM: len(b) - len(b.translate(None, _ASCII_ALNUM)),
            LETTER: letters,
            LATIN: letters,
            CJK: 0,
        }
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    classes = char_classes()[np.minimum(cps, 0xFFFF)]
    astral = cps > 0xFFFF
    if astral.any():
        cjk = astral & (cps >= 0x20000) & (cps < 0x30000)
        classes = np.where(astral, np.where(cjk, ALNUM | LETTER | CJK, 0), classes).astype(np.uint8)
    per_bit = np.bincount(classes, minlength=32) @ _BITS_OF_CLASS  # one pass, then 32 x 5
    return dict(zip(_BITS, per_bit.tolist()))


@dataclass(frozen=True)
class CleaningConfig:
    lang: str = "any"  # en / zh / code / any: picks the defaults and the language check
    normalize: str = "NFC"
    prose_whitespace: bool = False
    min_chars: int = 1
    max_chars: int = 2_000_000
    min_alnum_ratio: float = 0.0
    min_lang_ratio: float = 0.0
    max_mean_line_chars: int = 0  # 0: no check
    dedup: bool = True

    @classmethod
    def for_lang(cls, lang: str, **overrides) -> CleaningConfig:
        if lang not in LANG_DEFAULTS:
            raise ValueError(f"unknown language {lang!r}; one of {sorted(LANG_DEFAULTS)}")
        config = replace(LANG_DEFAULTS[lang], **{k: v for k, v in overrides.items() if v is not None})
        if config.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {config.normalize!r}")
        return config

    def to_json(self) -> dict:
        return asdict(self)


LANG_DEFAULTS = {
    "en": CleaningConfig("en", prose_whitespace=True, min_chars=20, min_alnum_ratio=0.5, min_lang_ratio=0.8),
    "zh": CleaningConfig("zh", prose_whitespace=True, min_chars=5, min_alnum_ratio=0.5, min_lang_ratio=0.3),
    "code": CleaningConfig("code", min_chars=10, min_alnum_ratio=0.25, max_mean_line_chars=300),
    "any": CleaningConfig("any"),
}


def content_hash(text: str) -> int:
    """64-bit hash of a cleaned text (exact de-duplication)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class Cleaner:
    def __init__(self, config: CleaningConfig):
        self.config = config

    def __call__(self, text: str) -> tuple[str | None, str | None, list[str]]:
        """(cleaned text, reject reason or None, names of the rules that changed the text)."""
        c = self.config
        changed: list[str] = []
        if c.normalize != "none" and not unicodedata.is_normalized(c.normalize, text):
            text = unicodedata.normalize(c.normalize, text)
            changed.append("unicode_normalized")
        text, n = _CONTROL.subn("", text)
        if n:
            changed.append("control_chars_removed")
        if c.prose_whitespace:
            cleaned = text.strip()
            if "\n\n\n" in cleaned:
                cleaned = _MANY_NEWLINES.sub("\n\n", cleaned)
            if cleaned != text:
                changed.append("whitespace_normalized")
                text = cleaned
        return text, self._reject_reason(text), changed

    def _reject_reason(self, text: str) -> str | None:
        c = self.config
        if not text:
            return "empty_after_cleaning"
        if text.isspace():  # code and `any` keep whitespace as it is, so only this catches it
            return "whitespace_only"
        if len(text) < c.min_chars:
            return "too_short"
        if len(text) > c.max_chars:
            return "too_long"
        if c.max_mean_line_chars and len(text) > c.max_mean_line_chars * (text.count("\n") + 1):
            return "long_lines"
        if not (c.min_alnum_ratio or (c.min_lang_ratio and c.lang in ("en", "zh"))):
            return None
        probe = text[:PROBE_CHARS]
        counts = class_counts(probe)
        if c.min_alnum_ratio and counts[ALNUM] < c.min_alnum_ratio * (len(probe) - counts[SPACE]):
            return "low_alnum_ratio"
        if c.min_lang_ratio and c.lang in ("en", "zh"):
            own = counts[CJK if c.lang == "zh" else LATIN]
            if own < c.min_lang_ratio * counts[LETTER]:
                return "wrong_language"
        return None
