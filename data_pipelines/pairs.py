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
(:func:`judge`: the right tool called, the right command, the right result stated) scores each
answer 0-3; prompts whose answers differ become ranked records (``DIR/pairs.jsonl``), rendered
as above. Every answer is also written as a moss-003 dialogue with its ``judge`` score
(``DIR/samples.jsonl``), a dialogue set stage=tag can score (the quickstart tags the SFT
dialogues, as MOSS did: tag-conditioned SFT on a small model's own, mostly wrong, answers
makes it worse).

``python -m data_pipelines.pairs compare`` prints the evidence: held-out prompts answered by
the tag-conditioned model asked for the best vs the worst tag, and by a DPO model vs its SFT
start, each scored by the judge and by the reward model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines.render_common import ParsedRecord, RecordSource, ShardOutputs, render_records
from moss_train.chat import format as fmt
from moss_train.data import pairs as pairdata
from moss_train.data import sft
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
            np.save(pairdata.pairs_path(str(self.tmp_dir / split)), np.asarray(self.index[split], dtype=np.float64).reshape(-1, 3))
            shards[split] = {"responses": manifest["n_docs"], "pairs": len(self.index[split]), "tokens": manifest["n_tokens"]}
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
    provenance = {"inputs": [str(p) for p in inputs], "valid_inputs": [str(p) for p in valid_inputs], "tokenizer_dir": str(tokenizer_dir)}
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
def sample_turns(model, tokenizer, records: list[dict], temperature: float = 0.0, seed: int = 0, max_new_tokens=(80, 48),
                 top_p: float = 1.0) -> list[dict]:
    """Each record's first turn answered by `model`, the two-pass MOSS way: pass one writes the
    inner thoughts and commands, the commands really run (enabled plugins only), pass two gets
    the results and writes the reply. Returns the turn's fields (inner_thoughts, commands,
    results, moss). temperature 0: greedy."""
    from moss_train.chat.generate import generate_batch
    from moss_train.chat.plugins import run_commands

    end_commands, end_reply = (tokenizer.token_to_id(t) for t in (fmt.END_OF_COMMANDS, fmt.END_OF_REPLY))
    dialogues = [sft.parse_record(r).dialogue for r in records]
    enabled = [set(fmt.enabled_plugins(d.meta_instruction)) for d in dialogues]
    prompts = [_encode(tokenizer, fmt.prompt_segments(d.meta_instruction, [], d.turns[0].human[1:])) for d in dialogues]
    sample = dict(temperature=temperature, top_k=0, top_p=top_p, seed=seed, vocab_size=tokenizer.vocab_size)
    first = generate_batch(model, prompts, max_new_tokens[0], (end_commands, end_reply), tokenizer.pad_id, **sample)
    texts = [tokenizer.decode(ids) for ids in first]
    turns = []
    for text in texts:
        thoughts, commands = fmt.field_body(text, fmt.INNER_THOUGHTS), fmt.field_body(text, fmt.COMMANDS)
        turns.append({"inner_thoughts": _plain(thoughts), "commands": _plain(commands), "results": None, "moss": _plain(fmt.field_body(text, fmt.MOSS)) or ""})
    tool_rows = [i for i, ids in enumerate(first) if ids and ids[-1] == end_commands]
    if tool_rows:
        results = {i: run_commands(turns[i]["commands"] or "", enabled[i]) for i in tool_rows}
        second_prompts = [prompts[i] + first[i] + _encode(tokenizer, fmt.results_segments(results[i], 0)) for i in tool_rows]
        for i, ids in zip(tool_rows, generate_batch(model, second_prompts, max_new_tokens[1], (end_reply,), tokenizer.pad_id, **sample)):
            text = tokenizer.decode(ids)
            turns[i]["results"] = results[i] or None
            turns[i]["moss"] = _plain(fmt.field_body(text, fmt.MOSS)) or ""
    return turns


def _plain(body: str | None) -> str | None:
    """A generated field body as plain text (its leading space dropped; " None" -> None)."""
    if body is None or body == fmt.NONE_BODY:
        return None
    return body[1:] if body.startswith(" ") else body


def _encode(tokenizer, segments) -> list[int]:
    return [i for ids in fmt.encode_segments(tokenizer, segments) for i in ids]


JUDGE_MAX = 3  # a right answer: the right tool, the right command, the right result stated


def judge(record: dict, turn: dict) -> int:
    """The verifiable judge of the demo, 0..JUDGE_MAX: 1 for calling the problem's tool, 1 for
    the right command (its real output is the reference's), 1 for the right result stated.
    Calling the tool is credited on its own because it is the step a small model can learn to
    take: an answer without it is a guess (a guess that states the right result gets 1)."""
    from data_pipelines.demo_dialogues import calls_reference_tool, check_reply

    enabled = set(fmt.enabled_plugins(record["meta_instruction"]))
    commands = turn["commands"] or ""
    right_command, stated = check_reply(record["check"], commands, turn["moss"] or "", enabled)
    return int(calls_reference_tool(record["check"], commands, enabled)) + int(right_command) + int(stated)


def response_dialogue(record: dict, turn: dict, score: int) -> dict:
    """A sampled answer as a one-turn moss-003 record (with the judge's score)."""
    t = fmt.Turn.from_text(
        human=_human(record), moss=turn["moss"], inner_thoughts=turn["inner_thoughts"], commands=turn["commands"], results=turn["results"]
    )
    return {
        "conversation_id": record.get("conversation_id"),
        "meta_instruction": record["meta_instruction"],
        "num_turns": 1,
        "chat": {"turn_1": {spec.key: spec.render(t.body(spec.role)) for spec in fmt.FIELDS}},
        "category": record.get("category", "demo"),
        "check": record["check"],
        "judge": score,
    }


def _human(record: dict) -> str:
    return sft.parse_record(record).dialogue.turns[0].human[1:]


def sample_judged_pairs(model_dir, tokenizer_dir, dialogues: Path, out: Path, samples: int = 4, temperature: float = 1.0,
                        limit: int = 0, seed: int = 0, batch_size: int = 64) -> dict:
    """Write ``pairs.jsonl`` (ranked records) and ``samples.jsonl`` (every answer, judged)."""
    from moss_train.chat.generate import load_model

    model, tokenizer = load_model(model_dir), load_tokenizer(tokenizer_dir)
    records = [json.loads(line) for line in Path(dialogues).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "check" in r][: limit or None]
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as pair_file, open(out / "samples.jsonl", "w", encoding="utf-8") as sample_file:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            answers = [sample_turns(model, tokenizer, batch, temperature, seed=seed * 1000 + start + k) for k in range(samples)]
            for i, record in enumerate(batch):
                turns = [answers[k][i] for k in range(samples)]
                scores = [judge(record, t) for t in turns]
                counts.update(prompts=1, answers=samples)
                counts.update(f"judge_{s}" for s in scores)
                for turn, score in zip(turns, scores):
                    sample_file.write(json.dumps(response_dialogue(record, turn, score), ensure_ascii=False) + "\n")
                if len(set(scores)) > 1:
                    counts["ranked_prompts"] += 1
                    pair = {"meta_instruction": record["meta_instruction"], "prompt": _human(record), "responses": turns, "scores": scores}
                    pair_file.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return dict(counts)


# ------------------------------------------------------------------------------ evidence
def score_turns(reward_model, tokenizer, records: list[dict], turns: list[dict], batch_size: int = 32) -> list[float]:
    """Reward of each answer (as the last turn of its record's dialogue), read at its last token.
    A dialogue longer than the model's context keeps its last n_positions tokens (the answer)."""
    import torch

    conversations = [sft.parse_record(response_dialogue(r, t, 0)) for r, t in zip(records, turns)]
    context = reward_model.config.n_positions
    rendered = [ids[-context:] for ids, _ in sft.render_many(tokenizer, conversations)]
    scores = []
    with torch.no_grad():
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start : start + batch_size]
            longest = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), longest), tokenizer.pad_id, dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.from_numpy(ids)
            read = torch.tensor([len(ids) - 1 for ids in chunk])
            scores.extend(reward_model(input_ids, read_positions=read).float().tolist())
    return scores


def answer_figures(model, reward_model, tokenizer, records: list[dict], asked: list[dict] | None = None,
                   samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """`samples` answers to each record's prompt (greedy at temperature 0): the judge's verdict
    (right command and result), the share that called a tool at all, and the mean reward.
    `asked`: the records as put to the model (e.g. with a quality tag); the reward model scores
    the answers in the plain records' dialogue, as it was trained. The same seeds serve every model compared."""
    asked = asked or records
    scores, rewards, called = [], [], []
    for k in range(samples):
        for start in range(0, len(asked), 64):
            plain = records[start : start + 64]
            turns = sample_turns(model, tokenizer, asked[start : start + 64], temperature, seed=seed + 1000 * k + start, top_p=top_p)
            scores.extend(judge(r, t) for r, t in zip(plain, turns))
            called.extend(t["commands"] is not None for t in turns)
            rewards.extend(score_turns(reward_model, tokenizer, plain, turns))
    return {
        "prompts": len(records),
        "answers": len(scores),
        "right": sum(s == JUDGE_MAX for s in scores) / max(1, len(scores)),
        "judge_mean": float(np.mean(scores)) if scores else 0.0,
        "tool_called": sum(called) / max(1, len(called)),
        "reward_mean": float(np.mean(rewards)) if rewards else 0.0,
    }


def conditioned(records: list[dict], level: int, levels: int, template: str) -> list[dict]:
    """The records with the quality tag line in their meta instruction."""
    return [{**r, "meta_instruction": fmt.with_quality(r["meta_instruction"], level, levels, template)} for r in records]


def compare(args) -> int:
    """Best vs worst tag (and DPO vs SFT) on held-out prompts, judged and scored."""
    from moss_train.chat.generate import load_model

    tokenizer = load_tokenizer(args.tokenizer)
    reward_model = _load_reward(args.reward_model)
    records = [json.loads(line) for line in Path(args.dialogues).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "check" in r][: args.limit or None]
    greedy = args.temperature <= 0  # one answer per prompt: greedy answers repeat
    sampling = dict(samples=1 if greedy else args.samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    def figures(model, asked=None) -> dict:
        return answer_figures(model, reward_model, tokenizer, records, asked, **sampling)

    result: dict = {"sampling": sampling}
    if args.preference:
        quality = json.loads((Path(args.preference) / "quality.json").read_text())
        model = load_model(args.preference)
        levels, template = quality["levels"], quality["template"]
        result["best_tag"] = figures(model, conditioned(records, levels, levels, template))
        result["worst_tag"] = figures(model, conditioned(records, 1, levels, template))
    if args.dpo:
        result["dpo"] = figures(load_model(args.dpo))
    if args.sft:
        result["sft"] = figures(load_model(args.sft))
    how = "greedy" if greedy else f"{args.samples} sampled at temperature {args.temperature}, top_p {args.top_p}"
    print(f"held-out prompts: {len(records)}, answers {how}; right = right command and result stated; reward = the reward model")
    for name, row in result.items():
        if name != "sampling":
            print(f"  {name:<10} right {row['right']:6.1%}   judge {row['judge_mean']:.3f}/{JUDGE_MAX}   tool called {row['tool_called']:6.1%}   "
                  f"reward {row['reward_mean']:+.3f}   ({row['answers']} answers)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _load_reward(path):
    """A reward model from a moss-train checkpoint (stage=reward) or a moss-export directory."""
    from moss_train.checkpoint.sources import open_source
    from moss_train.model.reward import RewardModel

    source = open_source(path)
    if "score.weight" not in source.names:
        raise SystemExit(f"{path} is not a reward model (no score head)")
    source.verify()
    model = RewardModel(source.model_config)
    model.load_state_dict({name: source.tensor(name).float() for name in source.names if not name.startswith("lm_head.")})
    return model.eval()


# ------------------------------------------------------------------------------------- CLI
def cmd_pairs(args) -> int:
    inputs, valid_inputs = list(args.input or []), list(args.valid_input or [])
    out = Path(args.out)
    if args.sample_from:
        if not args.dialogues:
            raise SystemExit("moss-data pairs: --sample-from needs --dialogues (demo dialogues with checks)")
        counts = sample_judged_pairs(args.sample_from, args.tokenizer, Path(args.dialogues), out, args.samples, args.temperature, args.limit, args.seed)
        print(f"pairs: sampled {counts.get('answers', 0)} answers to {counts.get('prompts', 0)} prompts; judge scores "
              f"{ {k: v for k, v in sorted(counts.items()) if k.startswith('judge_')} }; {counts.get('ranked_prompts', 0)} prompts ranked")
        inputs = [out / "pairs.jsonl", *inputs]
        if args.valid_dialogues:
            counts = sample_judged_pairs(args.sample_from, args.tokenizer, Path(args.valid_dialogues), out / "valid-samples",
                                         args.samples, args.temperature, args.valid_limit, args.seed + 1)
            valid_inputs = [out / "valid-samples" / "pairs.jsonl", *valid_inputs]
    if not inputs:
        raise SystemExit("moss-data pairs: give --input FILES (or --sample-from MODEL)")
    meta = Path(args.meta_instruction[1:]).read_text(encoding="utf-8") if args.meta_instruction and args.meta_instruction.startswith("@") else args.meta_instruction
    summary = render_pairs(inputs, args.tokenizer, out, valid_inputs=valid_inputs, valid_fraction=args.valid_fraction, meta_instruction=meta, seed=args.seed)
    print(f"pairs: {summary['records_in']} records -> {summary['groups_written']} response groups, {summary['rejected']} rejected "
          f"{summary['rejected_by_reason'] or ''} in {summary['seconds']}s")
    for split, s in summary["shards"].items():
        print(f"  {split:<8} {s['responses']:>7} responses {s['pairs']:>7} pairs {s['tokens']:>9} tokens")
    print(f"  rejects: {summary['rejects_file']}")
    return 0


def add_parser(sub) -> None:
    """Register ``moss-data pairs`` on the moss-data subcommand parser."""
    p = sub.add_parser("pairs", help="render preference pairs into pair shards, or sample and judge pairs from a model")
    p.add_argument("--input", nargs="+", help="jsonl / json files, folders or globs of pair records (chosen/rejected, messages, HH-RLHF, ranked)")
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
    p.add_argument("--limit", type=int, default=0, help="use only the first N tool-use prompts of --dialogues")
    p.add_argument("--valid-limit", type=int, default=0, help="use only the first N tool-use prompts of --valid-dialogues")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pairs)


def main(argv=None) -> int:
    """python -m data_pipelines.pairs compare --tokenizer DIR --reward-model RUN --dialogues valid.jsonl [--preference RUN] [--dpo RUN --sft RUN]"""
    import argparse

    parser = argparse.ArgumentParser(description="preference evidence on held-out demo prompts")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--reward-model", required=True)
    p.add_argument("--dialogues", required=True)
    p.add_argument("--preference", help="a stage=preference run (asked for the best and the worst tag)")
    p.add_argument("--dpo", help="a stage=dpo run")
    p.add_argument("--sft", help="the SFT run DPO started from")
    p.add_argument("--limit", type=int, default=0)
    # MOSS 003's recommended sampling, several answers per prompt: greedy answers hide how the
    # tag shifts the distribution the model samples from.
    p.add_argument("--samples", type=int, default=4, help="answers per prompt (sampling only)")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = parser.parse_args(argv)
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
