"""The tokenizer in Hugging Face form: AutoTokenizer loads it and gives MossTokenizer's ids;
any HF tokenizer directory works in its place; training reads every input format."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from data_pipelines.clean import CleaningConfig
from data_pipelines.tokenize_corpus import TokenizeSettings, tokenize_corpus
from moss_train.data.shards import TokenShard
from moss_train.tokenizer import MOSS_SPECIAL_TOKENS, HFTokenizer, MossTokenizer, load_tokenizer

from conftest import BIN, run_cli

TURNS = [
    "<|Human|>: 你好，请写一个 Python 函数<eoh>\n<|Inner Thoughts|>: None<eot>\n"
    "<|Commands|>: Calculator(2+3)<eoc>\n<|Results|>: 5<eor>\n<|MOSS|>: def add(a, b):\n    return a + b<eom>",
    "<|Human|>:<eoh><|MOSS|>:<eom><|Inner Thoughts|><|Inner Thoughts|>",
    "  tabs\tand\r\nCRLF, émojis 🙂, full-width ＡＢＣ１２３, rare 龘靐, a literal ▁ and  two  spaces ",
]


@pytest.fixture(scope="module")
def mixed_tok(pretrain_data, tmp_path_factory) -> Path:
    """Trained by the CLI from three formats at once: jsonl, jsonl.gz and parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = pretrain_data / "corpus"
    inputs = tmp_path_factory.mktemp("tok-inputs")
    zh_gz = inputs / "zh.jsonl.gz"
    zh_gz.write_bytes(gzip.compress((corpus / "zh.train.jsonl").read_bytes()))
    code_lines = (corpus / "code.train.jsonl").read_text(encoding="utf-8").splitlines()
    pq.write_table(pa.table({"content": [json.loads(line)["text"] for line in code_lines]}), inputs / "code.parquet")
    out = tmp_path_factory.mktemp("tok-mixed")
    run_cli(
        [
            "train-tokenizer",
            "--out",
            str(out),
            "--vocab-size",
            "3000",
            "--sample-mb",
            "1",
            "--input",
            f"en={corpus / 'en.train.jsonl'}",
            "--input",
            f"zh={zh_gz}",
            "--input",
            f"code={inputs / 'code.parquet'}",
            "--text-field",
            "en=text,zh=text,code=content",
        ],
        launcher=[str(BIN / "moss-data")],
    )
    return out


def _real_texts(pretrain_data) -> list[str]:
    texts = []
    for source in ("en", "zh", "code"):
        for split in ("valid", "train"):
            lines = (pretrain_data / "corpus" / f"{source}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
            texts += [t for t in (json.loads(line)["text"] for line in lines[:40]) if len(t) < 20_000]
    return texts + TURNS


def test_autotokenizer_gives_identical_ids(mixed_tok, pretrain_data):
    from transformers import AutoTokenizer

    meta = json.loads((mixed_tok / "tokenizer_meta.json").read_text())
    assert set(meta["training"]["sources"]) == {"en", "zh", "code"}  # every format was read
    assert all(s["sampled_docs"] > 0 for s in meta["training"]["sources"].values())
    tok = MossTokenizer.load(mixed_tok)
    hf = AutoTokenizer.from_pretrained(str(mixed_tok))  # no trust_remote_code
    assert len(hf) == tok.vocab_size
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id, hf.unk_token_id) == (
        tok.eos_id,
        tok.pad_id,
        tok.bos_id,
        tok.unk_id,
    )
    texts = _real_texts(pretrain_data)
    ours = tok.encode_batch(texts)
    theirs = hf(texts, add_special_tokens=False)["input_ids"]
    mismatched = [t[:60] for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched, mismatched[:3]
    for t in MOSS_SPECIAL_TOKENS:  # one id each, the same one
        assert hf(t, add_special_tokens=False)["input_ids"] == [tok.special_ids[t]]
    for text, ids in zip(TURNS, theirs[-len(TURNS) :]):  # a literal "▁" decodes as a space in both
        assert hf.decode(ids) == text.replace("▁", " ") == tok.decode(ids)
    assert hf.convert_ids_to_tokens(tok.special_ids["<|Inner Thoughts|>"]) == "<|Inner Thoughts|>"


def test_save_pretrained_elsewhere_and_hf_only_directory(mixed_tok, pretrain_data, tmp_path):
    tok = MossTokenizer.load(mixed_tok)
    export = tok.save_pretrained(tmp_path / "export", extra_config={"chat_template": "{{ messages }}"})
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    assert isinstance(load_tokenizer(export), MossTokenizer) and MossTokenizer.load(export).hash == tok.hash
    # Only the HF files: the stages get an HFTokenizer with the same interface and ids.
    hf_only = tmp_path / "hf-only"
    hf_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(export / name, hf_only / name)
    wrapped = load_tokenizer(hf_only)
    assert isinstance(wrapped, HFTokenizer) and wrapped.hash != tok.hash
    assert (wrapped.vocab_size, wrapped.eos_id, wrapped.pad_id) == (tok.vocab_size, tok.eos_id, tok.pad_id)
    assert wrapped.special_ids == tok.special_ids
    texts = _real_texts(pretrain_data)[::7]
    assert wrapped.encode_batch(texts) == tok.encode_batch(texts)
    assert wrapped.decode(tok.encode(TURNS[0])) == TURNS[0]
    # ... and tokenizes a corpus into shards that carry its hash.
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in dict.fromkeys(texts)), encoding="utf-8"
    )
    settings = TokenizeSettings("mix", cleaning=CleaningConfig.for_lang("any", normalize="none"))
    tokenize_corpus([str(src)], hf_only, tmp_path / "hf-shards", settings, workers=1)
    tokenize_corpus([str(src)], mixed_tok, tmp_path / "moss-shards", settings, workers=1)
    a, b = TokenShard(tmp_path / "hf-shards" / "part-00000"), TokenShard(tmp_path / "moss-shards" / "part-00000")
    assert a.tokenizer_hash == wrapped.hash and b.tokenizer_hash == tok.hash
    assert a.tokens.tolist() == b.tokens.tolist() and a.doc_offsets.tolist() == b.doc_offsets.tolist()


def test_hf_directory_needs_an_eos(tmp_path):
    from tokenizers import Tokenizer, models

    from moss_train.tokenizer import TokenizerError

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(TokenizerError, match="no eos token"):
        load_tokenizer(tmp_path)
