"""SFT data: the MOSS format, loss masks on real moss-003 conversations, bad input, truncation,
packing and padding, the mask stream in shards."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.sft import render_sft
from moss_train import format as fmt
from moss_train.config import compose, to_object, validate
from moss_train.data import parsing, rendering, sft
from moss_train.data.packed import PackedSequenceDataset, pack_best_fit
from moss_train.data.shards import ShardChecksumError, ShardWriter, TokenShard, mask_path, open_shards
from moss_train.engine.stage import StageContext
from moss_train.errors import ConfigError
from moss_train.stages.lm import build_causal_lm
from moss_train.stages.sft import SFTStage
from moss_train.tokenizer import MossTokenizer

from conftest import REPO

# The workspace's shared data sits beside the checkout; MOSS_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("MOSS_SHARED_DIR", REPO.parent / "shared"))
SAMPLE = SHARED / "data" / "moss-003-sft-sample" / "conversations.jsonl"
FIELD_KEYS = [spec.key for spec in fmt.FIELDS]
CATEGORIES = {"plain", "calculator", "equation_solver", "web_search", "text2img", "mix"}


@pytest.fixture(scope="module")
def sample_records() -> list[dict]:
    if not SAMPLE.is_file():
        pytest.skip(f"the shared moss-003 sample is not at {SAMPLE} (set MOSS_SHARED_DIR)")
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer(pretrain_data) -> MossTokenizer:
    return MossTokenizer.load(pretrain_data / "tokenizer")


def moss003_text(record: dict) -> str:
    return record["meta_instruction"] + "".join(turn[key] for turn in record["chat"].values() for key in FIELD_KEYS)


def decoded_spans(tokenizer, ids, flags, bit) -> list[str]:
    return [tokenizer.decode(ids[a:b]) for a, b in rendering.loss_spans(flags, bit)]


# ------------------------------------------------------------------------------ the format
def test_meta_instructions_are_rebuilt_from_their_capability_lines(sample_records):
    metas = {r["meta_instruction"] for r in sample_records}
    assert len(metas) == 6
    for meta in metas:
        thoughts = "- Inner thoughts: enabled." in meta
        assert fmt.meta_instruction(fmt.enabled_plugins(meta), inner_thoughts=thoughts) == meta


def test_rendering_is_the_moss003_text_exactly(sample_records):
    for record in sample_records:
        conversation = parsing.parse_record(record)
        assert fmt.render(conversation.dialogue) == moss003_text(record)


def test_loss_masks_on_every_real_conversation(sample_records, tokenizer):
    """Decode the loss-bearing spans of every sample conversation under both masks and compare
    them with the text fields they must be (default: inner thoughts + commands, then the reply,
    per turn; moss_reference: everything but the meta instruction and the results' content)."""
    conversations = [parsing.parse_record(r) for r in sample_records]
    rendered = rendering.render_many(tokenizer, conversations)
    checked, mismatches = Counter(), []
    for record, conversation, (ids, flags) in zip(sample_records, conversations, rendered):
        turns = list(record["chat"].values())
        default = []
        for t in turns:
            default += [t["Inner Thoughts"] + t["Commands"], t["MOSS"]]
        reference, pending = [], ""
        for t in turns:
            results = t["Tool Responses"]
            body_end = len(results) - len("<eor>\n")
            reference.append(
                pending + t["Human"] + t["Inner Thoughts"] + t["Commands"] + results[: len("<|Results|>:")]
            )
            pending = results[body_end:] + t["MOSS"]
        reference.append(pending)
        assert tokenizer.decode(ids) == moss003_text(record)
        got_default = decoded_spans(tokenizer, ids, flags, rendering.LOSS_DEFAULT)
        got_reference = decoded_spans(tokenizer, ids, flags, rendering.LOSS_MOSS_REFERENCE)
        if got_default != default or got_reference != reference:
            mismatches.append(record["source_file"])
        # Nothing of the meta instruction, the human turns or the results carries the default loss.
        text_off = tokenizer.decode(ids[(flags & rendering.LOSS_DEFAULT) == 0])
        assert all(t["Human"] in text_off and t["Tool Responses"] in text_off for t in turns)
        checked[conversation.category] += 1
    print(
        f"\nmask check on the moss-003 sample: {sum(checked.values())} conversations {dict(checked)}, "
        f"mismatches {len(mismatches)}"
    )
    assert not mismatches, mismatches[:5]
    assert set(checked) == CATEGORIES and sum(checked.values()) == len(sample_records) == 550


def test_messages_and_alpaca_records(tokenizer):
    messages = {
        "messages": [
            {"role": "system", "content": "You are MOSS."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! 你好"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    conversation = parsing.parse_record(messages)
    assert conversation.dialogue.meta_instruction == "You are MOSS.\n" and len(conversation.dialogue.turns) == 2
    ids, flags = rendering.render(tokenizer, conversation)
    none_fields = "<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n"
    assert decoded_spans(tokenizer, ids, flags, rendering.LOSS_DEFAULT) == [
        none_fields,
        "<|MOSS|>: Hello! 你好<eom>\n",
        none_fields,
        "<|MOSS|>: 4<eom>\n",
    ]
    alpaca = parsing.parse_record({"instruction": "Translate", "input": "cat", "output": "猫"}, meta_instruction="M\n")
    assert fmt.render(alpaca.dialogue) == (
        "M\n<|Human|>: Translate\n\ncat<eoh>\n" + none_fields + "<|Results|>: None<eor>\n<|MOSS|>: 猫<eom>\n"
    )
    assert parsing.parse_record({"instruction": "Hi", "output": "Hello"}).category == "plain"


BAD_RECORDS = [
    ("[1, 2]", parsing.NOT_AN_OBJECT),
    ('{"text": "no dialogue here"}', parsing.UNKNOWN_FORMAT),
    ("{not json", "invalid_json"),
    (
        '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}',
        parsing.WRONG_ROLE_ORDER,
    ),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', parsing.WRONG_ROLE_ORDER),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}', parsing.UNKNOWN_ROLE),
    (
        '{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
        parsing.NON_STRING_CONTENT,
    ),
    ('{"instruction": 5, "output": "x"}', parsing.NON_STRING_CONTENT),
]


def _broken(record: dict, how: str) -> dict:
    record = json.loads(json.dumps(record))
    if how == "missing_field":
        del record["chat"]["turn_1"]["Commands"]
    elif how == "num_turns":
        record["num_turns"] = record["num_turns"] + 1
    elif how == "non_string":
        record["chat"]["turn_1"]["MOSS"] = 42
    elif how == "turn_order":
        record["chat"] = dict(reversed(list(record["chat"].items())))  # turn_2 before turn_1
    elif how == "malformed":
        record["chat"]["turn_1"]["Human"] = record["chat"]["turn_1"]["Human"].replace("<eoh>", "")
    return record


def test_bad_input_is_counted_by_reason_and_written_to_rejects(sample_records, tokenizer, pretrain_data, tmp_path):
    good = sample_records[:40]  # real quirks: int and str ids, records without a category
    assert {type(r["conversation_id"]) for r in sample_records} == {int, str}
    assert any("category" not in r for r in sample_records)
    good += [r for r in sample_records if "category" not in r][:3]
    breakages = {
        "missing_field": parsing.MISSING_FIELD,
        "num_turns": parsing.NUM_TURNS_MISMATCH,
        "non_string": parsing.NON_STRING_CONTENT,
        "turn_order": parsing.WRONG_TURN_ORDER,
        "malformed": parsing.MALFORMED_FIELD,
    }
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    multi_turn = [r for r in good if r["num_turns"] >= 2]
    lines += [json.dumps(_broken(multi_turn[i], how), ensure_ascii=False) for i, how in enumerate(breakages)]
    lines += [raw for raw, _ in BAD_RECORDS]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a blank line is not a record
    # A limit some first turns exceed (skipped) and some conversations exceed later (cut).
    rendered = rendering.render_many(tokenizer, [parsing.parse_record(r) for r in good])
    first_turns = sorted(
        int(np.append(np.flatnonzero(flags & rendering.TURN_START), len(ids))[1]) for ids, flags in rendered
    )
    limit = first_turns[len(first_turns) // 4]
    too_long = sum(rendering.kept_length(flags, limit) == 0 for _, flags in rendered)
    cut = sum(0 < rendering.kept_length(flags, limit) < len(ids) for ids, flags in rendered)
    assert too_long > 0 and cut > 0

    summary = render_sft([path], pretrain_data / "tokenizer", tmp_path / "out", max_length=limit)
    expected = Counter(breakages.values()) + Counter(reason for _, reason in BAD_RECORDS)
    expected[parsing.FIRST_TURN_TOO_LONG] = too_long
    assert summary["rejected_by_reason"] == dict(sorted(expected.items()))
    assert summary["truncated"] == cut
    assert summary["records_in"] == len(lines) == summary["conversations_written"] + summary["rejected"]
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == summary["rejected"] and all(
        r["file"] == str(path) and r["line"] > 0 and r["detail"] for r in rejects
    )
    written = open_shards([p.with_suffix("") for p in sorted((tmp_path / "out" / "shards").glob("*.json"))])
    assert sum(s.n_docs for s in written) == summary["conversations_written"] == len(good) - too_long
    assert all(s.has_mask and len(s.document(i)) <= limit for s in written for i in range(s.n_docs))


def test_whole_turn_truncation(sample_records, tokenizer):
    long_ones = [r for r in sample_records if r["num_turns"] >= 4][:20]
    for record in long_ones:
        ids, flags = rendering.render(tokenizer, parsing.parse_record(record))
        turn_starts = np.flatnonzero(flags & rendering.TURN_START)
        assert len(turn_starts) == record["num_turns"]
        limit = int(turn_starts[2]) + 5  # room for two whole turns and a little of the third
        kept = rendering.kept_length(flags, limit)
        turns = list(record["chat"].values())
        assert tokenizer.decode(ids[:kept]) == record["meta_instruction"] + "".join(
            t[k] for t in turns[:2] for k in FIELD_KEYS
        )
        assert rendering.kept_length(flags, int(turn_starts[1]) - 1) == 0  # the first turn does not fit: skipped
        assert rendering.kept_length(flags, len(ids)) == len(ids)


# ------------------------------------------------------------------- inputs as tokenize reads them
def _dialogue(i: int, *turns: tuple[str, str]) -> dict:
    turns = turns or ((f"What is {i}+{i}?", f"It is {2 * i}."),)
    return {
        "messages": [
            {"role": role, "content": text} for q, a in turns for role, text in (("user", q), ("assistant", a))
        ]
    }


def _lines(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_sft_reads_inputs_as_tokenize_does_and_a_bad_line_loses_nothing(pretrain_data, tmp_path, caplog):
    """A folder, a glob, .gz/.bz2/.xz/.zst and a json array, as moss-data tokenize reads them; a
    line of invalid UTF-8 (which ended the whole run) is one counted reject naming its file and
    line; an empty file is a warning; what a killed run left in the output folder is cleared."""
    import bz2
    import gzip
    import lzma

    zstandard = pytest.importorskip("zstandard")
    records = [_dialogue(i) for i in range(12)]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(_lines(records[:2]) + b'{"messages": "\xff\xfe broken"}\n' + _lines(records[2:4]))
    folder = tmp_path / "more"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(_lines(records[4:6])))
    (folder / "sub" / "c.jsonl.bz2").write_bytes(bz2.compress(_lines(records[6:7])))
    (folder / "d.jsonl.xz").write_bytes(lzma.compress(_lines(records[7:8])))
    (folder / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_lines(records[8:9])))
    (folder / "empty.jsonl").write_bytes(b"")
    globbed = tmp_path / "globbed"
    globbed.mkdir()
    (globbed / "f.json").write_text(json.dumps(records[9:11]))
    (globbed / "g.jsonl").write_bytes(_lines(records[11:]))
    out = tmp_path / "out"
    (out / "shards.tmp").mkdir(parents=True)  # a killed run's leftovers
    (out / "shards.tmp" / "train.plain.bin").write_bytes(b"stale")
    (out / "rejects.jsonl.tmp").write_text('{"stale": true}\n')

    summary = render_sft([plain, folder, str(globbed / "*.json*")], pretrain_data / "tokenizer", out)
    assert summary["records_in"] == 13 and summary["conversations_written"] == 12
    assert summary["rejected_by_reason"] == {"undecodable_utf8": 1}
    [reject] = _rejects(out)
    assert (reject["file"], reject["line"], reject["reason"]) == (str(plain), 3, "undecodable_utf8")
    assert "invalid start byte" in reject["detail"] and "broken" in reject["record"]
    assert summary["empty_inputs"] == [str(folder / "empty.jsonl")]
    assert f"{folder / 'empty.jsonl'} holds no records" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl", "shards", "summary.json"]
    written = open_shards([p.with_suffix("") for p in sorted((out / "shards").glob("*.json"))])
    assert sum(shard.n_docs for shard in written) == 12
    with pytest.raises(ValueError, match="read from jsonl or json files"):
        (tmp_path / "notes.txt").write_text("a dialogue?\n")
        render_sft([tmp_path / "notes.txt"], pretrain_data / "tokenizer", tmp_path / "out2")


def test_an_interrupted_render_leaves_no_temporary_files(pretrain_data, tmp_path):
    from data_pipelines.render_common import RecordSource, render_records
    from data_pipelines.sft import _Outputs, _render_chunk

    path = tmp_path / "a.jsonl"
    path.write_bytes(_lines([_dialogue(i) for i in range(5)]))
    out = tmp_path / "out"
    render_sft([path], pretrain_data / "tokenizer", out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    seen = []

    def parse_then_ctrl_c(record):
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return parsing.parse_record(record)

    with pytest.raises(KeyboardInterrupt):
        render_records(
            RecordSource([path]),
            pretrain_data / "tokenizer",
            out,
            provenance={},
            make_outputs=_Outputs,
            parse=parse_then_ctrl_c,
            render_chunk=lambda pending, outputs: _render_chunk(pending, outputs, 0),
            chunk_size=1,
        )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier outputs, nothing else


def test_a_huge_record_is_refused_by_its_characters_before_tokenizing(pretrain_data, tmp_path):
    """A 50 MB record was tokenized whole (50 s, 2.7 GB) before the length check; by its
    characters it cannot fit, which costs no tokenizer time. A huge later turn is cut the same way."""
    huge = "many words " * 3_000_000  # 33 MB
    path = tmp_path / "big.jsonl"
    path.write_bytes(_lines([_dialogue(1, ("hi", huge)), _dialogue(2, ("hi", "hello"), (huge, "ok")), _dialogue(3)]))
    started = time.monotonic()
    summary = render_sft([path], pretrain_data / "tokenizer", tmp_path / "out", max_length=1024)
    seconds = time.monotonic() - started
    assert (
        summary["rejected_by_reason"] == {parsing.FIRST_TURN_TOO_LONG: 1} and _rejects(tmp_path / "out")[0]["line"] == 1
    )
    assert summary["conversations_written"] == 2 and (summary["truncated"], summary["turns_dropped"]) == (1, 1)
    assert seconds < 15, f"{seconds:.1f} s: the huge turns were tokenized"
    written = open_shards([p.with_suffix("") for p in sorted((tmp_path / "out" / "shards").glob("*.json"))])
    assert all(len(s.document(i)) <= 1024 for s in written for i in range(s.n_docs))


# --------------------------------------------------------------------------- shards with masks
def test_mask_stream_round_trip_and_checksum(tmp_path):
    prefix = tmp_path / "dialogues"
    docs = [(np.arange(5), np.array([0, 1, 1, 3, 4])), (np.arange(3) + 7, np.array([4, 0, 2]))]
    with ShardWriter(prefix, "uint16", "hash", "calculator", with_mask=True) as writer:
        with pytest.raises(ValueError, match="one value per token"):
            writer.add_document([1, 2, 3], [1, 1])
        for ids, mask in docs:
            writer.add_document(ids, mask)
    shard = TokenShard(prefix, verify=True)
    assert shard.has_mask and shard.manifest["mask"]["dtype"] == "uint8"
    for i, (ids, mask) in enumerate(docs):
        assert shard.document(i).tolist() == ids.tolist() and shard.document_mask(i).tolist() == mask.tolist()
    # A reader that does not ask for the mask is unaffected: pretraining packs the same tokens.
    assert PackedSequenceDataset([shard], 4)[0]["input_ids"].tolist() == [0, 1, 2, 3]
    raw = bytearray(mask_path(prefix).read_bytes())
    raw[0] ^= 1
    mask_path(prefix).write_bytes(bytes(raw))
    with pytest.raises(ShardChecksumError, match=r"dialogues\.mask"):
        TokenShard(prefix, verify=True)
    with ShardWriter(tmp_path / "plain", "uint16", "hash", "en") as writer:
        with pytest.raises(ValueError, match="not expected"):
            writer.add_document([1, 2], [0, 0])
        writer.add_document([1, 2])
    assert not TokenShard(tmp_path / "plain").has_mask


# ----------------------------------------------------------------------- packing and padding
def test_best_fit_packing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=300)
    bins = pack_best_fit(lengths, 128)
    assert sorted(j for b in bins for j in b) == list(range(300))
    assert all(sum(lengths[j] for j in b) <= 128 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 128 * 1.1))  # close to the lower bound
    assert bins == pack_best_fit(lengths, 128)
    with pytest.raises(ValueError, match="exceeds"):
        pack_best_fit([129], 128)


@pytest.fixture(scope="module")
def sample_shards(sample_records, pretrain_data, tmp_path_factory) -> Path:
    """60 real conversations (10 per category) rendered into SFT shards."""
    per_category: dict[str, list] = {}
    for record in sample_records:
        per_category.setdefault(parsing.parse_record(record).category, []).append(record)
    chosen = [r for records in per_category.values() for r in records[:10]]
    out = tmp_path_factory.mktemp("sft-sample")
    (out / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    render_sft([out / "in.jsonl"], pretrain_data / "tokenizer", out, valid_fraction=0.2, seed=1)
    return out


def _stage_data(shards_dir: Path, pretrain_data: Path, tmp_path: Path, **sft_settings):
    overrides = [
        "stage=sft",
        "data=sft_moss003_sample",
        "model=tiny",
        "model.n_embd=64",
        "model.rotary_dim=8",
        f"data.root={shards_dir}",
        f"data.tokenizer={pretrain_data / 'tokenizer'}",
        "data.seq_len=2048",
        "model.n_positions=2048",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=4",
        f"run.output_dir={tmp_path}",
        *[f"sft.{k}={v}" for k, v in sft_settings.items()],
    ]
    cfg = to_object(compose(overrides))
    stage = SFTStage()
    tokenizer = MossTokenizer.load(pretrain_data / "tokenizer")
    ctx = StageContext(cfg, tokenizer)
    data = stage.build_data(ctx)
    return replace(ctx, data=data), stage, tokenizer, data


def test_packed_samples_keep_conversations_apart(sample_shards, pretrain_data, tmp_path):
    _, stage, tokenizer, data = _stage_data(sample_shards, pretrain_data, tmp_path)
    conversations = data.train.conversations
    seen = 0
    for b in range(len(data.train)):
        sample = data.train[b]
        at = 0
        for segment, j in enumerate(data.train.bins[b]):
            ids, flags = conversations.tokens(j)
            n = len(ids)
            assert sample["input_ids"][at : at + n].tolist() == ids.tolist()
            assert (sample["segment_ids"][at : at + n] == segment).all()
            assert sample["position_ids"][at : at + n].tolist() == list(range(n))
            expected = np.where(flags[1:] & rendering.LOSS_DEFAULT, ids[1:], sft.IGNORE_INDEX).tolist() + [
                sft.IGNORE_INDEX
            ]
            assert sample["labels"][at : at + n].tolist() == expected  # none across the boundary
            at += n
            seen += 1
        assert (sample["labels"][at:] == sft.IGNORE_INDEX).all() and (
            sample["input_ids"][at:] == tokenizer.pad_id
        ).all()
    assert seen == len(conversations) and len(data.train) < len(conversations)  # several per sequence
    report = json.loads((tmp_path / "sft_data.json").read_text())
    assert report["train"]["truncated"] > 0 and report["train"]["kept"] == len(conversations)


def test_packed_and_padded_batches_give_the_same_losses(sample_shards, pretrain_data, tmp_path):
    """Same conversations, same weights: the token-mean loss and per-category losses of all
    packed sequences equal those of the padded rows (document isolation and masks agree)."""
    torch.manual_seed(0)
    results = {}
    for packing in ("packed", "padded"):
        ctx, stage, tokenizer, data = _stage_data(sample_shards, pretrain_data, tmp_path / packing, packing=packing)
        torch.manual_seed(0)
        model = build_causal_lm(ctx.cfg, tokenizer).eval()
        totals = Counter()
        with torch.no_grad():
            for start in range(0, len(data.eval), 2):
                batch = data.collate([data.eval[i] for i in range(start, min(start + 2, len(data.eval)))])
                terms = stage.loss(ctx, model, batch)
                totals["loss"] += terms.loss_sum.item()
                totals["targets"] += terms.num_targets.item()
                for name, value in terms.sums.items():
                    totals[name] += float(value)
                    totals[name + "/count"] += float(terms.counts.get(name, terms.num_targets))
        results[packing] = totals
    packed, padded = results["packed"], results["padded"]
    assert packed["targets"] == padded["targets"] > 0
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    categories = [k for k in packed if k.startswith("loss_cat_") and not k.endswith("/count")]
    assert len(categories) >= 3
    for name in categories:
        assert packed[name] == pytest.approx(padded[name], rel=1e-5), name


def test_moss_reference_mask_adds_human_and_format_tokens(sample_shards, pretrain_data, tmp_path):
    counts = {}
    for mask in ("default", "moss_reference"):
        _, _, _, data = _stage_data(sample_shards, pretrain_data, tmp_path / mask, loss_mask=mask)
        counts[mask] = sum(int((data.train[i]["labels"] != sft.IGNORE_INDEX).sum()) for i in range(len(data.train)))
    assert counts["moss_reference"] > counts["default"] > 0


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    lengths = np.random.default_rng(3).integers(10, 2000, size=400)
    grouped = sft.length_grouped_order(lengths, global_batch_size=8, seed=5)
    assert sorted(grouped.tolist()) == list(range(400))
    assert grouped.tolist() == sft.length_grouped_order(lengths, 8, 5).tolist()
    assert grouped.tolist() != sft.length_grouped_order(lengths, 8, 6).tolist()
    random_order = np.random.default_rng(5).permutation(400)

    def padded(order):
        return sum(lengths[order[i : i + 4]].max() * 4 for i in range(0, 400, 4))

    assert padded(grouped) < 0.8 * padded(random_order)


def test_sft_recipe_errors_name_the_key(pretrain_data, tmp_path):
    with pytest.raises(ConfigError, match="sft.loss_mask"):
        validate(compose(["stage=sft", "data=sft_demo", "sft.loss_mask=everything"]), world_size=1)
    with pytest.raises(ConfigError, match="sft.packing"):
        validate(compose(["stage=sft", "data=sft_demo", "sft.packing=bins"]), world_size=1)
    tokenizer = MossTokenizer.load(pretrain_data / "tokenizer")
    with ShardWriter(tmp_path / "shards" / "train.plain", "uint16", tokenizer.hash, "plain") as writer:
        writer.add_document([5, 6, 7])  # a pretraining shard: no mask stream
    cfg = to_object(
        compose(
            [
                "stage=sft",
                "data=sft_demo",
                f"data.root={tmp_path}",
                f"data.tokenizer={pretrain_data / 'tokenizer'}",
                f"run.output_dir={tmp_path}",
            ]
        )
    )
    with pytest.raises(ConfigError, match="data.train_shards.*loss-mask"):
        SFTStage().build_data(StageContext(cfg, tokenizer))
