"""The preference evidence: held-out prompts answered by a tag-conditioned model asked for each
quality level (best vs worst above all), and by a DPO model against its SFT start; every answer
judged (moss_train/eval/tool_use.py) and scored by the reward model.

Answers are sampled at MOSS 003's settings (temperature 0.7, top_p 0.8), several per prompt,
with the same seeds for every model compared: greedy answers hide how a tag shifts the
distribution the model samples from. Temperature 0 gives one greedy answer per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from moss_train import format as fmt
from moss_train.chat.protocol import Settings, TurnResult
from moss_train.data.parsing import parse_record
from moss_train.data.rendering import render_many
from moss_train.eval.tool_use import JUDGE_MAX, answer_first_turns, answer_record, called_a_tool, judge_answer, rate

MOSS_SAMPLING = Settings(temperature=0.7, top_p=0.8)  # MOSS 003's recommended sampling


@torch.no_grad()
def reward_scores(
    reward_model, tokenizer, records: Sequence[dict], answers: Sequence[TurnResult], batch_size: int = 32
) -> list[float]:
    """The reward of each answer as the first turn of its record's (plain) dialogue, read at its
    last token. A dialogue longer than the model's context keeps its last n_positions tokens."""
    conversations = [parse_record(answer_record(r, a)) for r, a in zip(records, answers)]
    context = reward_model.config.n_positions
    rendered = [ids[-context:] for ids, _ in render_many(tokenizer, conversations)]
    scores: list[float] = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        input_ids = torch.full((len(chunk), max(len(ids) for ids in chunk)), tokenizer.pad_id, dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.from_numpy(ids)
        scores.extend(
            reward_model(input_ids, read_positions=torch.tensor([len(ids) - 1 for ids in chunk])).float().tolist()
        )
    return scores


def answer_figures(
    model,
    tokenizer,
    records: Sequence[dict],
    reward_model=None,
    asked: Sequence[dict] | None = None,
    samples: int = 1,
    settings: Settings = MOSS_SAMPLING,
) -> dict:
    """`samples` answers to each record's prompt: right (command and result), tool called, the
    judge's mean and the mean reward. `asked`: the records as put to the model (e.g. with a
    quality tag); the judge and the reward model see the plain records, as the reward model was
    trained. Sample k of every model draws from the seed settings.seed + 1000 k."""
    asked = asked or records
    scores, called, rewards = [], [], []
    for k in range(samples):
        answers = answer_first_turns(
            model, tokenizer, asked, dataclasses.replace(settings, seed=settings.seed + 1000 * k)
        )
        scores += [judge_answer(r, a) for r, a in zip(records, answers)]
        called += [called_a_tool(a) for a in answers]
        if reward_model is not None:
            rewards += reward_scores(reward_model, tokenizer, records, answers)
    return {
        "prompts": len(records),
        "answers": len(scores),
        "right": rate(sum(s == JUDGE_MAX for s in scores), len(scores)),
        "tool_called": rate(sum(called), len(called)),
        "judge_mean": float(np.mean(scores)) if scores else 0.0,
        "reward_mean": float(np.mean(rewards)) if rewards else None,
    }


def conditioned(records: Sequence[dict], level: int, levels: int, template: str) -> list[dict]:
    """The records with the quality tag line in their meta instruction (the tag-conditioned form)."""
    return [
        {**r, "meta_instruction": fmt.with_quality(r["meta_instruction"], level, levels, template)} for r in records
    ]


def by_quality_level(
    model,
    tokenizer,
    records,
    quality_form: dict,
    reward_model=None,
    samples: int = 1,
    settings: Settings = MOSS_SAMPLING,
    levels: Sequence[int] | None = None,
) -> dict[int, dict]:
    """answer_figures of a tag-conditioned model asked for each quality level (default: all)."""
    total, template = int(quality_form["levels"]), quality_form["template"]
    return {
        level: answer_figures(
            model, tokenizer, records, reward_model, conditioned(records, level, total, template), samples, settings
        )
        for level in (levels or range(1, total + 1))
    }
