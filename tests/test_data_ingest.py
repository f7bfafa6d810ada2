"""Ingestion: every input format gives the same documents; bad input is counted, never fatal."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.clean import Cleaner, CleaningConfig, class_counts, content_hash
from data_pipelines.ingest import InputError, expand_inputs, iter_texts
from data_pipelines.tokenize_corpus import TokenizeSettings, tokenize_corpus
from moss_train.data.shards import TokenShard
from moss_train.tokenizer import MossTokenizer

HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None


@pytest.fixture(scope="module")
def texts(pretrain_data) -> list[str]:
    """Real documents of every source of the demo corpus (code keeps its whitespace)."""
    out = []
    for source in ("en", "zh", "code"):
        path = pretrain_data / "corpus" / f"{source}.valid.jsonl"
        if path.is_file():
            out += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()][:20]
    clean = Cleaner(CleaningConfig.for_lang("any"))
    out = [t for t in dict.fromkeys(out) if clean(t)[1:] == (None, [])]  # distinct, unchanged by cleaning
    assert len(out) >= 3
    return out


def _docs(out_dir: Path) -> list[list[int]]:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    docs = []
    for part in manifest["parts"]:
        shard = TokenShard(out_dir / part["name"], verify=True)
        docs += [shard.document(i).tolist() for i in range(shard.n_docs)]
    return docs


def _tokenize(inputs, tok_dir, out_dir, **kw) -> dict:
    settings = TokenizeSettings(
        kw.pop("source", "mix"),
        text_field=kw.pop("text_field", "text"),
        txt_unit=kw.pop("txt_unit", "line"),
        max_record_bytes=kw.pop("max_record_bytes", 64 << 20),
        cleaning=kw.pop("cleaning", CleaningConfig.for_lang("any")),
    )
    return tokenize_corpus([str(i) for i in inputs], tok_dir, out_dir, settings, workers=kw.pop("workers", 1), **kw)


def _write_formats(root: Path, texts: list[str]) -> dict[str, Path]:
    """The same records in every supported on-disk format."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)).encode()
    paths = {
        "jsonl": root / "a.jsonl",
        "gz": root / "a.jsonl.gz",
        "bz2": root / "a.jsonl.bz2",
        "xz": root / "a.jsonl.xz",
    }
    paths["jsonl"].write_bytes(lines)
    paths["gz"].write_bytes(gzip.compress(lines))
    paths["bz2"].write_bytes(bz2.compress(lines))
    paths["xz"].write_bytes(lzma.compress(lines))
    if HAVE_ZSTD:
        import zstandard

        paths["zst"] = root / "a.jsonl.zst"
        paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    paths["json"] = root / "array.json"
    paths["json"].write_text(json.dumps([{"text": t} for t in texts], ensure_ascii=False, indent=1), encoding="utf-8")
    paths["parquet"] = root / "a.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), paths["parquet"], row_group_size=7)
    paths["nested"] = root / "nested.jsonl.gz"
    paths["nested"].write_bytes(
        gzip.compress("".join(json.dumps({"meta": {"body": t}}) + "\n" for t in texts).encode())
    )
    paths["hf_saved"] = root / "hf_saved"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(paths["hf_saved"]))
    return paths


def test_every_format_gives_the_same_documents(pretrain_data, texts, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    tok_dir = pretrain_data / "tokenizer"
    tok = MossTokenizer.load(tok_dir)
    (tmp_path / "in").mkdir()
    paths = _write_formats(tmp_path / "in", texts)
    want = [tok.encode(t) + [tok.eos_id] for t in texts]
    for name, path in paths.items():
        field = "meta.body" if name == "nested" else "text"
        summary = _tokenize([path], tok_dir, tmp_path / f"out-{name}", text_field=field)
        assert summary["records_in"] == len(texts) and summary["rejected"] == {}, name
        assert _docs(tmp_path / f"out-{name}") == want, name
    # A folder: walked in sorted order, unknown files ignored (and listed), not fatal.
    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.jsonl.gz").write_bytes(paths["gz"].read_bytes())
    (folder / "1.txt").write_text("".join(f"line {i} of a plain text file\n" for i in range(3)), encoding="utf-8")
    (folder / "README.md").write_text("not data")
    summary = _tokenize([folder], tok_dir, tmp_path / "out-folder")
    assert summary["ignored_files"] == [str(folder / "README.md")]
    assert summary["records_in"] == 3 + len(texts)
    assert _docs(tmp_path / "out-folder")[3:] == want
    # A local data folder through `datasets` (hf:PATH, the json builder; offline).
    data_dir = tmp_path / "hf_files"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_bytes(paths["jsonl"].read_bytes())
    _tokenize([f"hf:{data_dir}"], tok_dir, tmp_path / "out-hf-files")
    assert _docs(tmp_path / "out-hf-files") == want


def test_txt_units(pretrain_data, tmp_path):
    text = "first line\nsecond line\n\n\nthird paragraph\nstill third\n"
    path = tmp_path / "t.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    assert list(iter_texts([str(path)], txt_unit="line")) == [
        "first line",
        "second line",
        "third paragraph",
        "still third",
    ]
    assert list(iter_texts([str(path)], txt_unit="paragraph")) == [
        "first line\nsecond line",
        "third paragraph\nstill third",
    ]
    assert list(iter_texts([str(path)], txt_unit="document")) == [text]
    summary = _tokenize([path], pretrain_data / "tokenizer", tmp_path / "out", txt_unit="line")
    assert summary["records_in"] == 6 and summary["docs"] == 4 and summary["rejected"] == {"empty_text": 2}


def test_bad_input_is_counted_and_written_never_fatal(pretrain_data, tmp_path):
    """Malformed JSON, invalid UTF-8, empty and huge records, missing fields, unreadable files:
    records in == kept + rejected, each reject in the rejects file with its reason."""
    tok_dir = pretrain_data / "tokenizer"
    good = ["The quick brown fox jumps.", "你好，世界。", "def f():\n\treturn 1\n", "<|Human|>: hi<eoh>"]
    raw_lines = [
        json.dumps({"text": good[0]}).encode(),
        b"{not json",
        json.dumps({"text": good[1]}, ensure_ascii=False).encode(),
        json.dumps(["a", "list"]).encode(),
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": ""}).encode(),
        b"",
        b'{"text": "caf\xe9 latin-1, not UTF-8"}',
        json.dumps({"text": "x" * 5000}).encode(),  # over max_record_bytes (the raw line)
        json.dumps({"text": good[2], "extra": 1}).encode(),
        json.dumps({"text": good[2]}).encode(),  # an exact duplicate
        json.dumps({"text": "\x00\x01" + good[3]}).encode(),  # control characters: cleaned, kept
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(raw_lines) + b"\n")
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(b"this is not gzip data")
    (tmp_path / "in" / "c.json").write_text('[{"text": "fine"}, {"text": broken}, {"text": "lost"}]')
    (tmp_path / "in" / "d.parquet").write_bytes(b"PAR1 but not really parquet")
    summary = _tokenize([tmp_path / "in"], tok_dir, tmp_path / "out", max_record_bytes=4096)

    assert summary["rejected"] == {
        "invalid_json": 2,
        "not_an_object": 1,
        "missing_text_field": 1,
        "text_not_a_string": 1,
        "null_text": 1,
        "empty_text": 1,
        "blank_line": 1,
        "undecodable_utf8": 1,
        "record_too_large": 1,
        "duplicate": 1,
        "unreadable_file": 2,
    }
    assert summary["docs"] == 5
    assert summary["records_in"] == 14 + 1 + 2 + 1 == summary["docs"] + sum(summary["rejected"].values())
    assert summary["cleaning_changed"] == {"control_chars_removed": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "part-00000.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(summary["rejected"].values())
    by_reason: dict[str, list] = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r)
    assert by_reason["invalid_json"][0]["line"] == 2 and by_reason["invalid_json"][0]["record"] == "{not json"
    assert by_reason["record_too_large"][0]["line"] == 11
    assert by_reason["duplicate"][0]["line"] == 13
    assert [r["input"].rsplit("/", 1)[1] for r in by_reason["unreadable_file"]] == ["b.jsonl.gz", "d.parquet"]
    assert "BadGzipFile" in by_reason["unreadable_file"][0]["record"]
    assert by_reason["invalid_json"][1]["input"].endswith("c.json") and by_reason["invalid_json"][1]["index"] == 1
    # Nothing valid is lost: the 4 good texts (cleaned) and "fine", in input order.
    tok = MossTokenizer.load(tok_dir)
    assert [tok.decode(d) for d in _docs(tmp_path / "out")] == [*good, "fine"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["rejected"] == summary["rejected"] and manifest["totals"]["docs"] == 5


def test_unknown_inputs_fail_up_front_naming_them(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="x.csv: unknown format"):
        expand_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(InputError, match="hf:surely-not/a-cached-dataset: cannot load"):
        expand_inputs(["hf:surely-not/a-cached-dataset"])  # offline: fails fast, names the input
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder has no"):
        expand_inputs([str(tmp_path / "empty")])


def test_cleaning_rules():
    en = Cleaner(CleaningConfig.for_lang("en"))
    zh = Cleaner(CleaningConfig.for_lang("zh"))
    code = Cleaner(CleaningConfig.for_lang("code"))
    prose = "  The quick brown fox jumps over the lazy dog.\n\n\n\nAgain.  "
    assert en(prose) == ("The quick brown fox jumps over the lazy dog.\n\nAgain.", None, ["whitespace_normalized"])
    src = "def f(x):\n\tif x:\n\t\treturn  x  \n\n\n\n"
    assert code(src) == (src, None, [])  # code keeps its whitespace
    assert en("Cafe\u0301 au lait, s'il vous plait, merci beaucoup")[2] == ["unicode_normalized"]  # NFC
    assert en("tab\tand\x00nul\x7f and a lone \ud800 surrogate!")[:2] == ("tab\tandnul and a lone  surrogate!", None)
    assert en("short")[1] == "too_short"
    assert en("这是一个中文句子，而不是英文的句子，所以它的语言不对。")[1] == "wrong_language"
    assert zh("This sentence is English, not Chinese at all.")[1] == "wrong_language"
    assert zh("人民日报：迈向充满希望的新世纪")[1] is None
    assert en("@@@@ #### $$$$ %%%% ^^^^ &&&& **** (((( )))) !!!!")[1] == "low_alnum_ratio"
    assert code("x=" + "1," * 400)[1] == "long_lines"
    assert Cleaner(CleaningConfig.for_lang("any", max_chars=10))("01234567890")[1] == "too_long"
    assert content_hash("a") == content_hash("a") != content_hash("b")
    counts = class_counts("Hello wörld 你好 123 _ 𠀀 🙂")
    assert list(counts.values()) == [6, 16, 13, 10, 3]  # space, alnum, letters, latin, CJK


@pytest.mark.parametrize("lang", ["any", "code", "en", "zh"])
def test_a_whitespace_only_document_is_rejected_in_every_language(lang):
    """`any` and `code` keep whitespace as it is, so " \n\t " passed every rule (kept under
    tokenize --lang any; code's ratio check counts only non-space characters)."""
    clean = Cleaner(CleaningConfig.for_lang(lang))
    for blank in (" \n\t  ", "\n" * 40, "\u3000" * 30):
        assert clean(blank)[1] in ("whitespace_only", "empty_after_cleaning"), (lang, blank)
    assert Cleaner(CleaningConfig.for_lang("any"))(" \n\t ")[1] == "whitespace_only"
    assert Cleaner(CleaningConfig.for_lang("code"))(" " * 40)[1] == "whitespace_only"


def test_tokenize_counts_whitespace_only_documents(pretrain_data, texts, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in [texts[0], "   ", "\n\t\n", texts[1]]))
    summary = _tokenize([src], pretrain_data / "tokenizer", tmp_path / "out")
    assert summary["docs"] == 2 and summary["rejected"] == {"whitespace_only": 2}


def test_hashes_sidecar_matches_kept_documents(pretrain_data, texts, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + texts[:2]), encoding="utf-8")
    summary = _tokenize([src], pretrain_data / "tokenizer", tmp_path / "out")
    hashes = np.load(tmp_path / "out" / "part-00000.hashes.npy")
    assert summary["rejected"] == {"duplicate": 2}
    assert hashes.tolist() == [content_hash(t) for t in texts]
