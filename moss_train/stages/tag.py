"""Stage `tag`: score every assistant turn with the reward model; quality tags by quantile.

Trains nothing (a job, engine/stage.py): the stage declares the reward model
(``preference.reward_model``, a stage=reward checkpoint) as a frozen model, which the engine
builds under the run's ZeRO config (engine/setup.py: frozen_model); ``run`` scores the
dialogues of ``preference.tag_inputs`` (jsonl: moss003 / messages / alpaca): each dialogue is
rendered as for SFT and read at the end of each of its turns, one forward per dialogue. The
dialogues are spread over the ranks and the scores gathered.

Scores become levels 1..``preference.levels`` by quantile thresholds over the scores of the
FIRST file (the training set; the other files are tagged with the same thresholds), so each
level holds about the same share of its turns. Written to ``run.output_dir``:

- ``tagged/{name}.jsonl``: the records, each turn with ``quality`` (level) and ``reward`` fields
  (a moss-003 turn, an assistant message, or an alpaca record);
- ``thresholds.json``: levels, thresholds, quality template, per-file level counts;
- ``conditioned/shards/{name}.{category}``: the tag-conditioned SFT data stage=preference reads:
  one conversation per tagged turn, the dialogue up to that turn with the turn's tag line
  (``preference.quality_template``) in the meta instruction and the loss on that turn only;
- ``rejects.jsonl``: records that could not be read or whose first turn does not fit
  ``data.seq_len`` (later turns that do not fit stay untagged, counted).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from moss_train import format as fmt
from moss_train.data import parsing, rendering
from moss_train.data.pairs import turn_ends
from moss_train.data.shards import ShardWriter, dtype_for_vocab
from moss_train.distributed import broadcast_object, score_sharded
from moss_train.engine.stage import FrozenModel, JobStage, StageContext
from moss_train.errors import ConfigError
from moss_train.stages import lm

LOSS_BITS = rendering.LOSS_DEFAULT | rendering.LOSS_MOSS_REFERENCE


def quantile_thresholds(scores, levels: int) -> list[float]:
    """levels-1 cut points: the k/levels quantiles of `scores`."""
    return [float(q) for q in np.quantile(np.asarray(scores, dtype=np.float64), [k / levels for k in range(1, levels)])]


def quality_levels(scores, thresholds) -> list[int]:
    """Level 1..len(thresholds)+1 of each score (a score equal to a cut point goes up)."""
    return [
        int(level) + 1
        for level in np.searchsorted(np.asarray(thresholds), np.asarray(scores, dtype=np.float64), side="right")
    ]


def conditioned_example(
    conversation: parsing.Conversation, turn: int, level: int, levels: int, template: str
) -> parsing.Conversation:
    """The dialogue up to `turn`, its meta instruction carrying the turn's quality tag."""
    dialogue = fmt.Dialogue(
        fmt.with_quality(conversation.dialogue.meta_instruction, level, levels, template),
        conversation.dialogue.turns[: turn + 1],
    )
    return parsing.Conversation(dialogue, conversation.category, conversation.id)


def last_turn_only(flags: np.ndarray) -> np.ndarray:
    """Loss flags kept on the last turn only (earlier turns are context for the tagged one)."""
    flags = flags.copy()
    last = int(np.flatnonzero(flags & rendering.TURN_START)[-1])
    flags[:last] &= ~np.uint8(LOSS_BITS)
    return flags


def read_dialogues(path: Path, limit: int = 0) -> tuple[list[dict], list[parsing.Conversation], list[dict], int]:
    """The records of a dialogue file, parsed: (records, conversations, rejects, records read).
    With a `limit`, only the first `limit` records are read (a bad one counts, as a reject)."""
    records, conversations, rejects, records_in = [], [], [], 0
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if limit and records_in == limit:
                break
            if not line.strip():
                continue
            records_in += 1
            try:
                record = json.loads(line)
                conversations.append(parsing.parse_record(record))
                records.append(record)
            except ValueError as error:  # RecordError is a ValueError, as is bad JSON
                rejects.append(
                    {
                        "file": str(path),
                        "line": lineno,
                        "reason": getattr(error, "reason", "invalid_json"),
                        "detail": str(error),
                        "record": line.rstrip("\n")[:2000],
                    }
                )
    return records, conversations, rejects, records_in


class TagStage(JobStage):
    name = "tag"

    def frozen_models(self, ctx: StageContext) -> dict[str, FrozenModel]:
        """The reward model, once rank 0 has checked that it is one."""
        from moss_train.checkpoint.sources import open_source

        path = ctx.cfg.preference.reward_model
        problem = None
        if ctx.is_main and "score.weight" not in open_source(path).names:
            problem = f"{path} has no reward head (score.*): give a stage=reward checkpoint"
        problem = broadcast_object(problem)
        if problem:
            raise ConfigError("preference.reward_model", problem)
        return {"reward": FrozenModel(lm.build_reward_model, path)}

    def run(self, ctx: StageContext) -> list[dict]:
        cfg = ctx.cfg
        files = [
            self._score_file(cfg, Path(path), ctx.tokenizer, ctx.frozen["reward"]) for path in cfg.preference.tag_inputs
        ]
        if ctx.is_main:
            self._write(cfg, Path(cfg.run.output_dir), files, ctx.tokenizer)
        return []

    def _score_file(self, cfg, path: Path, tokenizer, model) -> dict:
        """Parse, render and score one dialogue file (every rank reads it; scores are shared)."""
        records, conversations, rejects, records_in = read_dialogues(path, cfg.preference.tag_limit)
        rendered = rendering.render_many(tokenizer, conversations)
        kept = [rendering.kept_length(flags, cfg.data.seq_len) for _, flags in rendered]
        fits = [j for j, n in enumerate(kept) if n > 0]
        for j in (j for j, n in enumerate(kept) if n == 0):
            rejects.append(
                {
                    "file": str(path),
                    "reason": parsing.FIRST_TURN_TOO_LONG,
                    "detail": f"{len(rendered[j][0])} tokens > data.seq_len {cfg.data.seq_len}",
                    "record": json.dumps(records[j], ensure_ascii=False)[:2000],
                }
            )
        device = getattr(model, "device", torch.device("cpu"))

        def score(indices: list[int]) -> list[list[float]]:
            rows = [
                (rendered[fits[i]][0][: kept[fits[i]]], turn_ends(rendered[fits[i]][1][: kept[fits[i]]]))
                for i in indices
            ]
            longest, most = max(len(ids) for ids, _ in rows), max(len(ends) for _, ends in rows)
            input_ids = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)
            read = torch.zeros((len(rows), most), dtype=torch.long)
            for r, (ids, ends) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.from_numpy(ids)
                read[r, : len(ends)] = torch.tensor(ends)
            with torch.no_grad():
                rewards = model(input_ids=input_ids.to(device), read_positions=read.to(device)).float().cpu()
            return [rewards[r, : len(ends)].tolist() for r, (_, ends) in enumerate(rows)]

        scores = score_sharded(len(fits), cfg.trainer.micro_batch_size, score)
        return {
            "path": path,
            "records": [records[j] for j in fits],
            "conversations": [conversations[j] for j in fits],
            "scores": scores,
            "rejects": rejects,
            "records_in": records_in,
            "turns": sum(len(c.dialogue.turns) for c in (conversations[j] for j in fits)),
        }

    def _write(self, cfg, out: Path, files: list[dict], tokenizer) -> None:
        pref = cfg.preference
        thresholds = quantile_thresholds([s for turns in files[0]["scores"] for s in turns], pref.levels)
        (out / "tagged").mkdir(parents=True, exist_ok=True)
        summary = {
            "levels": pref.levels,
            "thresholds": thresholds,
            "template": pref.quality_template,
            "reward_model": pref.reward_model,
            "files": {},
        }
        conditioned_tmp = out / "conditioned" / "shards.tmp"
        shutil.rmtree(conditioned_tmp, ignore_errors=True)
        writers: dict[str, ShardWriter] = {}
        provenance = {
            "quality": {"levels": pref.levels, "template": pref.quality_template, "thresholds": thresholds},
            "reward_model": pref.reward_model,
        }
        with open(out / "rejects.jsonl", "w", encoding="utf-8") as rejects_file:
            for file in files:
                name = file["path"].name.split(".")[0]
                counts: Counter = Counter()
                examples = []
                with open(out / "tagged" / f"{name}.jsonl", "w", encoding="utf-8") as tagged:
                    for record, conversation, scores in zip(file["records"], file["conversations"], file["scores"]):
                        levels = quality_levels(scores, thresholds)
                        counts.update(levels)
                        tagged.write(json.dumps(tag_record(record, scores, levels), ensure_ascii=False) + "\n")
                        examples.extend(
                            conditioned_example(conversation, t, level, pref.levels, pref.quality_template)
                            for t, level in enumerate(levels)
                        )
                for conversation, (ids, flags) in zip(examples, rendering.render_many(tokenizer, examples)):
                    key = f"{name}.{conversation.category}"
                    if key not in writers:
                        writers[key] = ShardWriter(
                            conditioned_tmp / key,
                            dtype_for_vocab(tokenizer.vocab_size),
                            tokenizer.hash,
                            source=conversation.category,
                            provenance=provenance,
                            with_mask=True,
                        )
                    writers[key].add_document(ids, last_turn_only(flags))
                for reject in file["rejects"]:
                    rejects_file.write(json.dumps(reject, ensure_ascii=False) + "\n")
                tagged_turns = sum(counts.values())
                assert file["records_in"] == len(file["records"]) + len(file["rejects"]), "record accounting is broken"
                summary["files"][name] = {
                    "input": str(file["path"]),
                    "limit": pref.tag_limit or None,
                    "records_in": file["records_in"],
                    "records_tagged": len(file["records"]),
                    "rejected": len(file["rejects"]),
                    "turns_tagged": tagged_turns,
                    "turns_untagged": file["turns"] - tagged_turns,
                    "per_level": {str(k): counts[k] for k in range(1, pref.levels + 1)},
                    "reward_mean": float(np.mean([s for t in file["scores"] for s in t])) if tagged_turns else None,
                }
                print(
                    f"[moss-train] tag {name}: {len(file['records'])} dialogues, {tagged_turns} turns tagged "
                    f"(per level {summary['files'][name]['per_level']}), {len(file['rejects'])} rejected",
                    flush=True,
                )
        for writer in writers.values():
            writer.close()
        final = out / "conditioned" / "shards"
        shutil.rmtree(final, ignore_errors=True)  # no shard of an earlier tagging lingers
        conditioned_tmp.rename(final)
        (out / "thresholds.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(
            f"[moss-train] tag thresholds ({pref.levels} levels): "
            f"{[round(t, 4) for t in thresholds]} -> {out / 'thresholds.json'}",
            flush=True,
        )


def tag_record(record: dict, scores: list[float], levels: list[int]) -> dict:
    """The record with `quality` and `reward` on each scored turn (moss003 turns, assistant
    messages, or the alpaca record itself)."""
    record = json.loads(json.dumps(record))
    if "chat" in record:
        targets = [record["chat"][f"turn_{t + 1}"] for t in range(len(scores))]
    elif "messages" in record:
        targets = [m for m in record["messages"] if m.get("role") == "assistant"][: len(scores)]
    else:
        targets = [record]
    for target, score, level in zip(targets, scores, levels):
        target["quality"], target["reward"] = level, round(float(score), 6)
    return record
