"""The built-in demo dialogue set: bilingual (EN / ZH) MOSS tool-use conversations with checkable answers.

moss-003's data cannot ship with the project, so the quickstart fine-tunes on dialogues made
here. Every tool turn really ran: the command is executed by the same calculator / equation
solver the chat side uses (moss_train/chat/plugins.py, sympy), its output is the
``<|Results|>`` field, and the reply states that output. Each record is a moss-003 record plus
``check``: the reference command and answer values of its first turn, so a model's held-out
turns can be scored (does it issue the right command, does its reply state the result).

Dialogues are one or two turns: a calculator or equation-solver problem (arithmetic, word
problems, linear equations, 2x2 systems), sometimes followed by a second problem, and a share
of plain turns (greetings, questions about MOSS) where no tool is called although tools are
enabled. Like human-written data, a share of the problems (DIRECT_SHARE) is answered right
without calling the enabled tool; a small model imitating them guesses, and that is the
behaviour the third stage (judged pairs, reward model, quality tags, DPO) learns to avoid. The
meta instruction enables the plugins the dialogue uses, so the category is calculator,
equation_solver or mix. The held-out split is drawn from its own seed and never
repeats a training prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from moss_train.chat import format as fmt
from moss_train.chat.plugins import TOOLS, parse_commands

# A problem: (human, inner thoughts, command api, command argument, reply from the tool's answer)
Problem = tuple[str, str, str, str, Callable[[str], str]]


# ----------------------------------------------------------------------- calculator problems
_OPS = {"+": ("plus", "加"), "-": ("minus", "减"), "*": ("times", "乘以"), "/": ("divided by", "除以")}


def _arithmetic(rng: random.Random, zh: bool) -> Problem:
    op = rng.choice(list(_OPS))
    # Two-digit operands: copying them into the command is within reach of the tiny demo model
    # (with three-digit ones it almost never issued the right calculator command).
    a, b = rng.randint(10, 99), rng.randint(2, 30)
    if op == "/":
        a = b * rng.randint(2, 30)
    if op == "-" and a < b:
        a, b = b, a
    expr = f"{a}{op}{b}"
    word_en, word_zh = _OPS[op]
    if zh:
        human = rng.choice([f"{a}{word_zh}{b}等于多少？", f"请计算{expr}。", f"帮我算一下{a}{op}{b}。", f"{expr}是多少？"])
        thought = f"用户需要计算{expr}，我应该调用计算器。"
        reply = lambda r: rng.choice([f"{expr}的结果是{r}。", f"{a}{word_zh}{b}等于{r}。", f"计算结果是{r}。"])
    else:
        human = rng.choice([f"What is {a} {word_en} {b}?", f"Calculate {expr}.", f"How much is {a} {op} {b}?", f"Please compute {expr}."])
        thought = f"The user wants to compute {expr}, so I should use the calculator."
        reply = lambda r: rng.choice([f"{a} {word_en} {b} is {r}.", f"The result of {expr} is {r}.", f"{expr} = {r}."])
    return human, thought, "Calculate", expr, reply


def _word_problem(rng: random.Random, zh: bool) -> Problem:
    kind = rng.randrange(4)
    a, b = rng.randint(3, 40), rng.randint(2, 30)
    if kind == 0:
        expr = f"{a}*{b}"
        human = f"一箱有{a}个苹果，{b}箱一共有多少个苹果？" if zh else f"A box holds {a} apples. How many apples are in {b} boxes?"
        reply = (lambda r: f"{b}箱一共有{r}个苹果。") if zh else (lambda r: f"There are {r} apples in {b} boxes.")
    elif kind == 1:
        a = a + b
        expr = f"{a}-{b}"
        human = f"小明有{a}元，花了{b}元，还剩多少元？" if zh else f"Tom has {a} dollars and spends {b} dollars. How much money does he have left?"
        reply = (lambda r: f"小明还剩{r}元。") if zh else (lambda r: f"Tom has {r} dollars left.")
    elif kind == 2:
        total = a * b
        expr = f"{total}/{b}"
        human = f"{total}块饼干平均分给{b}个人，每人分到几块？" if zh else f"{b} friends share {total} cookies equally. How many cookies does each friend get?"
        reply = (lambda r: f"每人分到{r}块饼干。") if zh else (lambda r: f"Each friend gets {r} cookies.")
    else:
        expr = f"{a}^2"
        human = f"{a}的平方是多少？" if zh else f"What is {a} squared?"
        reply = (lambda r: f"{a}的平方是{r}。") if zh else (lambda r: f"{a} squared is {r}.")
    thought = f"这是一道计算题，需要计算{expr}，我应该调用计算器。" if zh else f"This is an arithmetic problem: I need to compute {expr} with the calculator."
    return human, thought, "Calculate", expr, reply


# ------------------------------------------------------------------- equation-solver problems
def _linear_equation(rng: random.Random, zh: bool) -> Problem:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 30), rng.randint(1, 50)
    equation = f"{a}x+{b}={a * x + b}"
    human = rng.choice([f"解方程{equation}。", f"求解方程：{equation}"]) if zh else rng.choice([f"Solve {equation}.", f"Find x if {equation}."])
    thought = f"这是一个方程问题，我需要调用方程求解器求解{equation}。" if zh else f"This is an equation, so I need the equation solver for {equation}."
    reply = (lambda r: f"方程的解是{r}。") if zh else (lambda r: f"The solution is {r}.")
    return human, thought, "Solve", equation, reply


def _system(rng: random.Random, zh: bool) -> Problem:
    x, y = rng.randint(1, 60), rng.randint(1, 60)
    if x < y:
        x, y = y, x
    system = f"x+y={x + y};x-y={x - y}"
    if rng.random() < 0.5:
        human = f"解方程组：x+y={x + y}，x-y={x - y}。" if zh else f"Solve the system x + y = {x + y} and x - y = {x - y}."
    else:
        human = f"两个数的和是{x + y}，差是{x - y}，这两个数分别是多少？" if zh else f"The sum of two numbers is {x + y} and their difference is {x - y}. What are the numbers?"
    thought = f"可以列出方程组{system}，我需要调用方程求解器。" if zh else f"I can set up the system {system} and use the equation solver."
    reply = (lambda r: f"解得{r.replace(chr(10), '，')}。") if zh else (lambda r: f"The numbers are {r.replace(chr(10), ' and ')}.")
    return human, thought, "Solve", system, reply


DIRECT_SHARE = 0.3  # tool problems whose reference answer skips the tool (see the docstring)
_DIRECT_THOUGHTS = {
    ("Calculate", False): "I can work this out myself without the calculator.",
    ("Calculate", True): "这个我可以直接算出来，不需要调用计算器。",
    ("Solve", False): "I can solve this myself without the equation solver.",
    ("Solve", True): "这个方程我可以直接解出来，不需要调用方程求解器。",
}

_CALCULATOR = (_arithmetic, _word_problem)
_SOLVER = (_linear_equation, _system)
_PLAIN_EN = [
    ("Hello!", "Hello! I am MOSS, an AI assistant. How can I help you today?"),
    ("Who are you?", "I am MOSS, an AI assistant. I can answer questions and use tools such as a calculator."),
    ("Thank you!", "You are welcome! Let me know if there is anything else I can do."),
    ("What can you do?", "I can chat with you, and I can use a calculator and an equation solver for math problems."),
]
_PLAIN_ZH = [
    ("你好！", "你好！我是MOSS，一个人工智能助手。有什么可以帮你的吗？"),
    ("你是谁？", "我是MOSS，一个人工智能助手，可以回答问题，也可以使用计算器等工具。"),
    ("谢谢你！", "不客气！如果还有其他问题，随时问我。"),
    ("你能做什么？", "我可以和你聊天，也可以用计算器和方程求解器解决数学问题。"),
]


# -------------------------------------------------------------------------------- dialogues
def tool_turn(problem: Problem, direct: bool = False, zh: bool = False) -> tuple[fmt.Turn, dict]:
    """A turn whose command really runs; returns it and its check (command, answer values).

    `direct`: the reply states the same (really computed) answer without calling the tool.
    """
    human, thought, api, argument, reply = problem
    tool = TOOLS[api]
    answer = tool.run(argument)
    command = f'{api}("{argument}")'
    if direct:
        turn = fmt.Turn.from_text(human=human, inner_thoughts=_DIRECT_THOUGHTS[api, zh], moss=reply(answer))
    else:
        turn = fmt.Turn.from_text(
            human=human, inner_thoughts=thought, commands=command, results=[tool.result_line(argument, answer)], moss=reply(answer)
        )
    return turn, {"command": command, "plugin": tool.plugin, "answer": answer_values(api, answer)}


def answer_values(api: str, answer: str) -> list[str]:
    """What a reply must state: the calculator's number, or each "x = 5" of the solver."""
    return [answer] if api == "Calculate" else answer.split("\n")


def plain_turn(rng: random.Random, zh: bool) -> fmt.Turn:
    human, moss = rng.choice(_PLAIN_ZH if zh else _PLAIN_EN)
    return fmt.Turn.from_text(human=human, moss=moss)


def make_dialogue(rng: random.Random, conversation_id: int) -> dict:
    """One moss-003 record (+ check) drawn from `rng`."""
    zh = rng.random() < 0.5
    roll = rng.random()
    if roll < 0.12:
        plugins = rng.choice([["calculator"], ["equation_solver"], ["calculator", "equation_solver"]])
        turns, check = [plain_turn(rng, zh)], None
    else:
        first = rng.choice(_CALCULATOR if roll < 0.56 else _SOLVER)
        turn, check = tool_turn(first(rng, zh), direct=rng.random() < DIRECT_SHARE, zh=zh)
        turns = [turn]
        plugins = [check["plugin"]]
        if rng.random() < 0.2:  # a second question in the same dialogue
            second = rng.choice(_CALCULATOR + _SOLVER)(rng, zh)
            second_turn, second_check = tool_turn(second, direct=rng.random() < DIRECT_SHARE, zh=zh)
            turns.append(second_turn)
            plugins = sorted({*plugins, second_check["plugin"]}, key=fmt.ENABLEABLE_PLUGINS.index)
    meta = fmt.meta_instruction(plugins, preamble=fmt.SHORT_PREAMBLE)
    record = {
        "conversation_id": conversation_id,
        "meta_instruction": meta,
        "num_turns": len(turns),
        "chat": {f"turn_{i + 1}": _moss003_turn(t) for i, t in enumerate(turns)},
        "category": "demo_zh" if zh else "demo_en",
    }
    if check is not None:
        record["check"] = check
    return record


def _moss003_turn(turn: fmt.Turn) -> dict:
    return {spec.key: spec.render(turn.body(spec.role)) for spec in fmt.FIELDS}


def make_split(n: int, seed: int, exclude_prompts: set[str] = frozenset()) -> list[dict]:
    """`n` dialogues from `seed`, none of whose first prompts is in `exclude_prompts`."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        record = make_dialogue(rng, len(out) + 1)
        if first_prompt(record) not in exclude_prompts or "check" not in record:
            out.append(record)
    return out


def first_prompt(record: dict) -> str:
    return record["chat"]["turn_1"]["Human"]


def write_demo_dialogues(out_dir: str | Path, n_train: int = 4000, n_valid: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``valid.jsonl`` (held-out: own seed, no repeated tool prompt)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = make_split(n_train, seed)
    valid = make_split(n_valid, seed + 10_007, exclude_prompts={first_prompt(r) for r in train})
    paths = {}
    for split, records in (("train", train), ("valid", valid)):
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(path)
        paths[split] = path
    return paths


def check_reply(check: dict, commands_text: str, reply_text: str, enabled: set[str]) -> tuple[bool, bool]:
    """(right command, right result stated) for a model's first turn against the reference.

    The command is right when it names the reference tool and its real output equals the
    reference output (so ``15*24`` for ``24*15`` counts); the result is stated when the reply
    contains every reference answer value.
    """
    commands = parse_commands(commands_text)
    api = _reference_api(check)
    reference = TOOLS[api].run(check["command"][len(api) + 2 : -2])
    right_command = any(name == api and TOOLS[name].plugin in enabled and TOOLS[name].run(arg) == reference for name, arg in commands)
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


# ------------------------------------------------------------------------------ the figure
def evaluate_tool_use(model, tokenizer, records: list[dict], max_new_tokens=(80, 48), batch_size: int = 64) -> dict:
    """Score a model on the first turn of each held-out tool dialogue (see :func:`two_pass_replies`)."""
    cases = [r for r in records if "check" in r]
    totals, examples = Counter(), []
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        for record, (commands, reply, enabled) in zip(batch, two_pass_replies(model, tokenizer, batch, max_new_tokens)):
            right_command, stated = check_reply(record["check"], commands, reply, enabled)
            totals.update(prompts=1, right_command=right_command, result_stated=stated, both=right_command and stated)
            totals.update({f"prompts_{record['check']['plugin']}": 1, f"both_{record['check']['plugin']}": right_command and stated})
            if len(examples) < 6:
                examples.append({"human": record["chat"]["turn_1"]["Human"], "commands": commands, "reply": reply, "check": record["check"]})
    n = max(1, totals["prompts"])
    by_tool = {k[len("prompts_"):]: totals["both_" + k[len("prompts_"):]] / v for k, v in totals.items() if k.startswith("prompts_")}
    return {
        "prompts": totals["prompts"],
        **{k: totals[k] / n for k in ("right_command", "result_stated", "both")},
        "both_by_tool": by_tool,
        "examples": examples,
    }


def two_pass_replies(model, tokenizer, records: list[dict], max_new_tokens=(80, 48)) -> list[tuple[str, str, set]]:
    """(commands, reply, enabled plugins) for each record's first turn, by the two-pass MOSS
    protocol (moss_train/chat/protocol.py) with the built-in calculator and solver: pass one
    to ``<eoc>``, the enabled commands really run, pass two writes the reply."""
    from moss_train.chat.protocol import TurnRequest, builtin_plugins, two_pass
    from moss_train.data.sft import parse_record

    dialogues = [parse_record(r).dialogue for r in records]
    requests = [TurnRequest(d.meta_instruction, [], d.turns[0].human[1:]) for d in dialogues]
    results = two_pass(model, tokenizer, requests, builtin_plugins(), max_new_tokens=max_new_tokens)
    return [(r.commands, r.reply, set(fmt.enabled_plugins(d.meta_instruction))) for r, d in zip(results, dialogues)]


def main(argv=None) -> int:
    """python -m data_pipelines.demo_dialogues --checkpoint DIR --tokenizer DIR --dialogues valid.jsonl"""
    import argparse

    from moss_train.chat.generate import load_model
    from moss_train.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description="held-out tool use of a fine-tuned model on the demo dialogues")
    parser.add_argument("--checkpoint", required=True, help="a moss-train run, checkpoints or step directory, or an HF model directory")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--dialogues", required=True, help="held-out demo dialogues (valid.jsonl)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N tool dialogues")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint)
    tokenizer = load_tokenizer(args.tokenizer)
    records = [json.loads(line) for line in Path(args.dialogues).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "check" in r][: args.limit or None]
    result = evaluate_tool_use(model, tokenizer, records)
    print(
        f"held-out tool use ({result['prompts']} prompts): right command {result['right_command']:.1%}, "
        f"result stated in the reply {result['result_stated']:.1%}, both {result['both']:.1%} "
        f"({', '.join(f'{tool} {share:.1%}' for tool, share in sorted(result['both_by_tool'].items()))})"
    )
    for example in result["examples"][:3]:
        print(f"  {example['human'].strip()}\n    commands: {example['commands'].strip()}\n    reply: {example['reply'].strip()}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
