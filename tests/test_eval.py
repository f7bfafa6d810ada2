"""moss_train/eval: the tool-use figures and the judge, on the demo dialogues' own reference
answers (whose verdicts are known) and on corrupted copies of them."""

from __future__ import annotations

import dataclasses

import pytest

from data_pipelines.demo_dialogues import make_split
from moss_train import format as fmt
from moss_train.chat.plugins import parse_commands
from moss_train.data.parsing import parse_record
from moss_train.eval import tool_use


@pytest.fixture(scope="module")
def records():
    return tool_use.checked(make_split(300, seed=11))


def test_reference_answers_are_right_unless_they_answer_directly(records):
    answers = [tool_use.reference_answer(r) for r in records]
    result = tool_use.score_answers(records, answers)
    direct = sum(a.commands == fmt.NONE_BODY for a in answers)
    assert 0 < direct < len(records)  # the demo's direct answers (DIRECT_SHARE) are in the sample
    assert result["both"]["hits"] == result["right_command"]["hits"] == len(records) - direct
    assert result["result_stated"]["hits"] == len(records)  # every reference reply states its result
    assert result["prompts"] == result["both"]["n"] == len(records)
    p = result["both"]["rate"]
    assert result["both"]["stderr"] == pytest.approx((p * (1 - p) / len(records)) ** 0.5)
    assert sum(f["n"] for f in result["both_by_tool"].values()) == len(records)
    assert [tool_use.judge_answer(r, a) for r, a in zip(records, answers)] == [
        tool_use.JUDGE_MAX if a.commands != fmt.NONE_BODY else 1 for a in answers
    ]


def test_a_wrong_digit_in_the_reply_or_the_command_is_not_right(records):
    tool_cases = [
        (r, tool_use.reference_answer(r)) for r in records if tool_use.reference_answer(r).commands != fmt.NONE_BODY
    ][:40]
    for record, answer in tool_cases:
        value = record["check"]["answer"][0].split(" = ")[-1]
        wrong_reply = dataclasses.replace(answer, reply=answer.reply.replace(value, value + "1"))
        assert tool_use.judge_answer(record, wrong_reply) == tool_use.JUDGE_MAX - 1
        argument = parse_commands(answer.commands)[0][1]
        wrong_command = dataclasses.replace(answer, commands=answer.commands.replace(argument, argument + "1", 1))
        assert tool_use.judge_answer(record, wrong_command) == tool_use.JUDGE_MAX - 1
    result = tool_use.score_answers(
        [r for r, _ in tool_cases], [dataclasses.replace(a, reply="") for _, a in tool_cases]
    )
    assert result["both"]["hits"] == 0 and result["right_command"]["hits"] == len(tool_cases)


def test_answer_records_render_like_the_data(records):
    """An answer written back as a dialogue (pairs, stage=tag) is the reference record's rendering."""
    for record in records[:30]:
        rebuilt = tool_use.answer_record(record, tool_use.reference_answer(record), score=3)
        assert fmt.render(parse_record(rebuilt).dialogue).startswith(
            fmt.render(
                dataclasses.replace(parse_record(record).dialogue, turns=parse_record(record).dialogue.turns[:1])
            )
        )
        assert rebuilt["judge"] == 3 and rebuilt["check"] == record["check"]
