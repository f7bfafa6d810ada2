"""Tool use on dialogues with a verifiable reference: does the model call the right tool, with
the right command, and state the right result?

A record to score is a moss-003 dialogue whose first turn carries a ``check`` (the demo
dialogues of data_pipelines/demo_dialogues.py have one on every tool turn)::

    "check": {"command": "Calculate(\\"23*17\\")", "plugin": "calculator", "answer": ["391"]}

The model answers the first human turn the two-pass MOSS way (moss_train/chat/protocol.py):
pass one writes inner thoughts and commands, the commands really run with the enabled built-in
tools, pass two writes the reply. The verdict (:func:`check_reply`): the command is right when it
calls the reference's tool and the tool's real output equals the reference's (so ``15*24`` for
``24*15`` counts); the result is stated when the reply holds every reference answer value as a
whole number. The graded judge (:func:`judge`, 0..JUDGE_MAX) credits the tool call, the command
and the stated result one point each; "right" everywhere means both command and result.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence

from moss_train import format as fmt
from moss_train.chat.plugins import TOOLS, parse_commands
from moss_train.chat.protocol import Settings, TurnRequest, TurnResult, builtin_plugins, two_pass
from moss_train.data.parsing import parse_record

JUDGE_MAX = 3  # a right answer: the right tool, the right command, the right result stated
GREEDY = Settings(temperature=0.0)
MAX_NEW_TOKENS = (80, 48)  # pass one (thoughts + commands), pass two (the reply): the demo's answers fit
BATCH = 64  # prompts generated together


def checked(records: Sequence[dict]) -> list[dict]:
    """The records whose first turn has a check (tool turns of the demo dialogues)."""
    return [r for r in records if "check" in r]


def enabled_plugins(record: dict) -> set[str]:
    return set(fmt.enabled_plugins(record["meta_instruction"]))


def answer_first_turns(
    model,
    tokenizer,
    records: Sequence[dict],
    settings: Settings = GREEDY,
    max_new_tokens: tuple[int, int] = MAX_NEW_TOKENS,
    batch_size: int = BATCH,
) -> list[TurnResult]:
    """Each record's first turn answered by `model` (two-pass, built-in tools really run), in
    batches of `batch_size`; a sampled batch draws from the seed settings.seed + its start."""
    answers: list[TurnResult] = []
    plugins = builtin_plugins()
    for start in range(0, len(records), batch_size):
        requests = [_first_turn(r) for r in records[start : start + batch_size]]
        batch_settings = dataclasses.replace(settings, seed=settings.seed + start)
        answers.extend(two_pass(model, tokenizer, requests, plugins, batch_settings, max_new_tokens))
    return answers


def _first_turn(record: dict) -> TurnRequest:
    dialogue = parse_record(record).dialogue
    return TurnRequest(dialogue.meta_instruction, [], human_text(record))


def human_text(record: dict) -> str:
    """The first human turn's text (without the field's leading space)."""
    return parse_record(record).dialogue.turns[0].human[1:]


def check_reply(check: dict, commands_text: str, reply_text: str, enabled: set[str]) -> tuple[bool, bool]:
    """(right command, right result stated) of an answer against the record's check."""
    api = _reference_api(check)
    reference = TOOLS[api].run(check["command"][len(api) + 2 : -2])
    right_command = any(
        name == api and TOOLS[name].plugin in enabled and TOOLS[name].run(arg) == reference
        for name, arg in parse_commands(commands_text)
    )
    stated = bool(reply_text) and all(_states(value, reply_text) for value in check["answer"])
    return right_command, stated


def calls_reference_tool(check: dict, commands_text: str, enabled: set[str]) -> bool:
    """Whether the commands call the reference's tool (enabled), whatever its argument."""
    api = _reference_api(check)
    return any(name == api and TOOLS[name].plugin in enabled for name, _ in parse_commands(commands_text))


def _reference_api(check: dict) -> str:
    return check["command"].split("(", 1)[0]


def _states(value: str, text: str) -> bool:
    """`value` appears in `text` as a whole number (360 is not stated by 3600)."""
    return re.search(rf"(?<![\d.]){re.escape(value)}(?![\d])", text) is not None


def commands_of(answer: TurnResult) -> str:
    return "" if answer.commands == fmt.NONE_BODY else answer.commands


def called_a_tool(answer: TurnResult) -> bool:
    """Whether the answer issued any command at all."""
    return bool(parse_commands(commands_of(answer)))


def judge(record: dict, commands: str | None, reply: str | None) -> int:
    """The graded verifiable judge of an answer (its commands and reply texts), 0..JUDGE_MAX:
    1 for calling the problem's tool, 1 for the right command, 1 for the right result stated.
    Calling the tool is credited on its own because it is the step a small model can learn to
    take: an answer without it is a guess (a guess that states the right result gets 1)."""
    enabled, commands = enabled_plugins(record), commands or ""
    right_command, stated = check_reply(record["check"], commands, reply or "", enabled)
    return int(calls_reference_tool(record["check"], commands, enabled)) + int(right_command) + int(stated)


def judge_answer(record: dict, answer: TurnResult) -> int:
    return judge(record, commands_of(answer), answer.reply)


def rate(hits: int, n: int) -> dict:
    """A share with its count and binomial standard error."""
    p = hits / n if n else 0.0
    return {"rate": p, "hits": hits, "n": n, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}


def evaluate_tool_use(model, tokenizer, records: Sequence[dict], settings: Settings = GREEDY) -> dict:
    """The tool-use figures of `model` on the checked records' first turns (see score_answers)."""
    cases = checked(records)
    return score_answers(cases, answer_first_turns(model, tokenizer, cases, settings), settings)


def score_answers(
    records: Sequence[dict], answers: Sequence[TurnResult], settings: Settings = GREEDY, examples: int = 6
) -> dict:
    """Right command, result stated, both (the figure) and tool called, each with count and ±,
    and "both" per tool, of one answer per checked record; a few answers as examples."""
    totals: Counter = Counter()
    shown = []
    for record, answer in zip(records, answers):
        plugin = record["check"]["plugin"]
        right_command, stated = check_reply(record["check"], commands_of(answer), answer.reply, enabled_plugins(record))
        totals.update(
            prompts=1,
            right_command=right_command,
            result_stated=stated,
            both=right_command and stated,
            tool_called=called_a_tool(answer),
            **{f"prompts_{plugin}": 1, f"both_{plugin}": right_command and stated},
        )
        if len(shown) < examples:
            shown.append(
                {
                    "human": human_text(record),
                    "commands": answer.commands.strip(),
                    "reply": answer.reply,
                    "check": record["check"],
                }
            )
    n = totals["prompts"]
    tools = sorted(k[len("prompts_") :] for k in totals if k.startswith("prompts_"))
    return {
        "prompts": n,
        **{key: rate(totals[key], n) for key in ("both", "right_command", "result_stated", "tool_called")},
        "both_by_tool": {tool: rate(totals[f"both_{tool}"], totals[f"prompts_{tool}"]) for tool in tools},
        "settings": dataclasses.asdict(settings),
        "examples": shown,
    }


def format_rate(figure: dict) -> str:
    return f"{figure['rate']:.1%} ± {figure['stderr']:.1%} ({figure['hits']}/{figure['n']})"


def summary_line(result: dict) -> str:
    by_tool = ", ".join(f"{tool} {format_rate(f)}" for tool, f in result["both_by_tool"].items())
    return (
        f"held-out tool use ({result['prompts']} prompts): "
        f"right command and result stated {format_rate(result['both'])}; "
        f"right command {result['right_command']['rate']:.1%}, result stated {result['result_stated']['rate']:.1%}, "
        f"tool called {result['tool_called']['rate']:.1%} ({by_tool})"
    )


def _plain(body: str) -> str | None:
    """A field body as plain text (its leading space dropped; " None" -> None)."""
    return None if body == fmt.NONE_BODY else fmt.body_text(body)


def answer_fields(answer: TurnResult) -> dict:
    """An answer's fields as plain texts (the tool-use response form of moss_train/data/pairs.py)."""
    return {
        "inner_thoughts": _plain(answer.inner_thoughts),
        "commands": _plain(answer.commands),
        "results": answer.results or None,
        "moss": answer.reply,
    }


def reference_answer(record: dict) -> TurnResult:
    """The record's own first-turn answer, as the protocol would return it (its tools run)."""
    turn = parse_record(record).dialogue.turns[0]
    calls = [TOOLS[api].call(argument) for api, argument in parse_commands(turn.commands)]
    return TurnResult(
        human=turn.human[1:],
        inner_thoughts=turn.inner_thoughts,
        commands=turn.commands,
        tool_calls=calls,
        reply=turn.moss.strip(),
        finished=True,
    )


def answer_record(record: dict, answer: TurnResult, score: int | None = None) -> dict:
    """The record's first turn as `answer` gave it: a one-turn moss-003 record (with the judge's
    score), the form stage=tag and the reward model read."""
    turn = fmt.Turn.from_text(human=human_text(record), **answer_fields(answer))
    out = {
        "conversation_id": record.get("conversation_id"),
        "meta_instruction": record["meta_instruction"],
        "num_turns": 1,
        "chat": {"turn_1": {spec.key: spec.render(turn.body(spec.role)) for spec in fmt.FIELDS}},
        "category": record.get("category", "demo"),
        "check": record["check"],
    }
    if score is not None:
        out["judge"] = score
    return out
