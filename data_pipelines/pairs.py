"""``moss-data pairs``: preference pairs → pair shards; and judged pairs sampled from a model.

    moss-data pairs --input FILES... --tokenizer DIR --out DIR [--valid-input FILES... | --valid-fraction F]
                    [--meta-instruction TEXT|@FILE]
    moss-data pairs --sample-from MODEL --dialogues train.jsonl --tokenizer DIR --out DIR
                    [--samples 4] [--temperature 1.0] [--limit N] [--valid-dialogues valid.jsonl]

Rendering: records in the formats of moss_train/data/pairs.py (prompt/chosen/rejected strings,
message lists, HH-RLHF text, ranked lists) → ``DIR/shards/{train,valid}`` (each response one
document of a mask-carrying shard, ``.pairs.npy`` the pairs), ``DIR/rejects.jsonl`` (every
rejected record with its reason) and ``DIR/summary.json``; records in = groups written + rejected.

Sampling (``--sample-from``): for each tool-use prompt of the demo dialogues, the model answers
``--samples`` times, the MOSS two-pass way with its commands really run; a verifiable judge
(moss_train/eval/tool_use.py: the right tool called, the right command, the right result stated) scores each
answer 0-3; prompts whose answers differ become ranked records (``DIR/pairs.jsonl``), rendered
as above. Every answer is also written as a moss-003 dialogue with its ``judge`` score
(``DIR/samples.jsonl``), a dialogue set stage=tag can score: the quickstart tags them beside
the SFT dialogues (all right), so the low quality levels hold the model's wrong answers
(docs/quickstart.md: best vs worst tag 90.1% vs 43.9% with them, 88.9% vs 64.9% without).

``moss-eval compare`` (moss_train/eval/) prints the evidence: held-out prompts answered by the
tag-conditioned model asked for the best vs the worst tag, and by a DPO model vs its SFT start,
each scored by the judge and by the reward model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines.render_common import ParsedRecord, RecordSource, ShardOutputs, render_records
from moss_train.data import pairs as pairdata
from moss_train.tokenizer import load_tokenizer

CHUNK = 128  # groups rendered per tokenizer batch


# ----------------------------------------------------------------------------- rendering
class _PairOutputs(ShardOutputs):
    """One response shard + pair index per split."""

    written_key = "groups_written"

    def __init__(self, *args):
        super().__init__(*args)
        self.index: dict[str, list[tuple[int, int, float]]] = {}
        self.groups = 0

    def write(self, split: str, group: pairdata.PairGroup, rendered: list) -> None:
        writer = self.writer(split, split, source="pairs")
        first = writer.n_docs
        for ids, flags in rendered:
            writer.add_document(ids, flags)
        self.index.setdefault(split, []).extend((first + a, first + b, margin) for a, b, margin in group.pairs)
        self.groups += 1

    def close(self) -> dict:
        shards = {}
        for split, writer in sorted(self.writers.items()):
            manifest = writer.close()
            np.save(
                pairdata.pairs_path(str(self.tmp_dir / split)),
                np.asarray(self.index[split], dtype=np.float64).reshape(-1, 3),
            )
            shards[split] = {
                "responses": manifest["n_docs"],
                "pairs": len(self.index[split]),
                "tokens": manifest["n_tokens"],
            }
        return shards

    def count_written(self, shards: dict) -> int:
        return self.groups


def render_pairs(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    valid_inputs: Sequence[str | Path] = (),
    valid_fraction: float = 0.0,
    meta_instruction: str | None = None,
    seed: int = 0,
) -> dict:
    """Render the pair records of `inputs` (and `valid_inputs`) into pair shards under `out`."""
    provenance = {
        "inputs": [str(p) for p in inputs],
        "valid_inputs": [str(p) for p in valid_inputs],
        "tokenizer_dir": str(tokenizer_dir),
    }
    return render_records(
        RecordSource(inputs, valid_inputs, valid_fraction, seed),
        tokenizer_dir,
        out,
        provenance=provenance,
        make_outputs=_PairOutputs,
        parse=lambda record: pairdata.parse_pair_record(record, meta_instruction),
        render_chunk=_render_chunk,
        chunk_size=CHUNK,
    )


def _render_chunk(pending: list[ParsedRecord], outputs: _PairOutputs) -> None:
    rendered = pairdata.render_groups(outputs.tokenizer, [record.parsed for record in pending])
    for record, responses in zip(pending, rendered):
        outputs.write(record.split, record.parsed, responses)


# -------------------------------------------------------------- sampled, judged responses
def sample_judged_pairs(
    model_dir,
    tokenizer_dir,
    dialogues: Path,
    out: Path,
    samples: int = 4,
    temperature: float = 1.0,
    limit: int = 0,
    seed: int = 0,
    with_reference: bool = False,
) -> dict:
    """Each checked prompt of `dialogues` answered `samples` times by the model (two-pass, tools
    really run; moss_train/eval/tool_use.py) and judged. Writes ``pairs.jsonl`` (a ranked
    record per prompt whose answers differ) and ``samples.jsonl`` (every answer, judged).
    `with_reference`: the dialogue's own answer joins the ranking (judged like the samples), so a
    prompt the model always gets wrong still gives pairs (a weak model's whole sample would tie)."""
    from moss_train.chat.protocol import Settings
    from moss_train.checkpoint.export import load_model
    from moss_train.eval import tool_use

    model, tokenizer = load_model(model_dir), load_tokenizer(tokenizer_dir)
    lines = Path(dialogues).read_text(encoding="utf-8").splitlines()
    records = tool_use.checked(json.loads(line) for line in lines if line.strip())[: limit or None]
    answers = [
        tool_use.answer_first_turns(
            model, tokenizer, records, Settings(temperature=temperature, seed=seed * 1000 + k * 100_003)
        )
        for k in range(samples)
    ]
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    with (
        open(out / "pairs.jsonl", "w", encoding="utf-8") as pair_file,
        open(out / "samples.jsonl", "w", encoding="utf-8") as sample_file,
    ):
        for i, record in enumerate(records):
            turns = [answers[k][i] for k in range(samples)]
            scores = [tool_use.judge_answer(record, t) for t in turns]
            counts.update(prompts=1, answers=samples)
            counts.update(f"judge_{s}" for s in scores)
            for turn, score in zip(turns, scores):
                sample_file.write(json.dumps(tool_use.answer_record(record, turn, score), ensure_ascii=False) + "\n")
            responses = [tool_use.answer_fields(t) for t in turns]
            if with_reference:
                reference = tool_use.reference_answer(record)
                responses.append(tool_use.answer_fields(reference))
                scores.append(tool_use.judge_answer(record, reference))
                counts["references"] += 1
            if len(set(scores)) > 1:
                counts["ranked_prompts"] += 1
                pair = {
                    "meta_instruction": record["meta_instruction"],
                    "prompt": tool_use.human_text(record),
                    "responses": responses,
                    "scores": scores,
                }
                pair_file.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return dict(counts)


# ------------------------------------------------------------------------------------- CLI
def cmd_pairs(args) -> int:
    inputs, valid_inputs = list(args.input or []), list(args.valid_input or [])
    out = Path(args.out)
    if args.sample_from:
        if not args.dialogues:
            raise SystemExit("moss-data pairs: --sample-from needs --dialogues (demo dialogues with checks)")
        counts = sample_judged_pairs(
            args.sample_from,
            args.tokenizer,
            Path(args.dialogues),
            out,
            args.samples,
            args.temperature,
            args.limit,
            args.seed,
            args.with_reference,
        )
        print(
            f"pairs: sampled {counts.get('answers', 0)} answers to {counts.get('prompts', 0)} prompts; judge scores "
            f"{ {k: v for k, v in sorted(counts.items()) if k.startswith('judge_')} }; "
            f"{counts.get('ranked_prompts', 0)} prompts ranked"
        )
        inputs = [out / "pairs.jsonl", *inputs]
        if args.valid_dialogues:
            counts = sample_judged_pairs(
                args.sample_from,
                args.tokenizer,
                Path(args.valid_dialogues),
                out / "valid-samples",
                args.samples,
                args.temperature,
                args.valid_limit,
                args.seed + 1,
                args.with_reference,
            )
            valid_inputs = [out / "valid-samples" / "pairs.jsonl", *valid_inputs]
    if not inputs:
        raise SystemExit("moss-data pairs: give --input FILES (or --sample-from MODEL)")
    meta = (
        Path(args.meta_instruction[1:]).read_text(encoding="utf-8")
        if args.meta_instruction and args.meta_instruction.startswith("@")
        else args.meta_instruction
    )
    summary = render_pairs(
        inputs,
        args.tokenizer,
        out,
        valid_inputs=valid_inputs,
        valid_fraction=args.valid_fraction,
        meta_instruction=meta,
        seed=args.seed,
    )
    print(
        f"pairs: {summary['records_in']} records -> {summary['groups_written']} response groups, "
        f"{summary['rejected']} rejected {summary['rejected_by_reason'] or ''} in {summary['seconds']}s"
    )
    for split, s in summary["shards"].items():
        print(f"  {split:<8} {s['responses']:>7} responses {s['pairs']:>7} pairs {s['tokens']:>9} tokens")
    print(f"  rejects: {summary['rejects_file']}")
    return 0


def add_parser(sub) -> None:
    """Register ``moss-data pairs`` on the moss-data subcommand parser."""
    p = sub.add_parser("pairs", help="render preference pairs into pair shards, or sample and judge pairs from a model")
    p.add_argument(
        "--input",
        nargs="+",
        help="jsonl / json files, folders or globs of pair records (chosen/rejected, messages, HH-RLHF, ranked)",
    )
    p.add_argument("--valid-input", nargs="+", help="jsonl files of held-out pair records")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="hold out this share of --input (by content hash)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, help="output directory (shards/, rejects.jsonl, summary.json)")
    p.add_argument("--meta-instruction", help="meta instruction for records without one (text, or @FILE)")
    p.add_argument("--sample-from", help="a model (moss-train checkpoint or HF dir) to answer --dialogues, judged")
    p.add_argument("--dialogues", help="demo dialogues with checks (data/sft-demo/dialogues/train.jsonl)")
    p.add_argument("--valid-dialogues", help="held-out demo dialogues, sampled and judged into the valid split")
    p.add_argument("--samples", type=int, default=4, help="answers per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--with-reference", action="store_true", help="rank each dialogue's own answer with the sampled ones"
    )
    p.add_argument("--limit", type=int, default=0, help="use only the first N tool-use prompts of --dialogues")
    p.add_argument(
        "--valid-limit", type=int, default=0, help="use only the first N tool-use prompts of --valid-dialogues"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pairs)
