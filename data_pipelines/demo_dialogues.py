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
from collections.abc import Callable
from pathlib import Path

from moss_train import format as fmt
from moss_train.chat.plugins import TOOLS

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
        human = rng.choice(
            [f"{a}{word_zh}{b}等于多少？", f"请计算{expr}。", f"帮我算一下{a}{op}{b}。", f"{expr}是多少？"]
        )
        thought = f"用户需要计算{expr}，我应该调用计算器。"

        def reply(r):
            return rng.choice([f"{expr}的结果是{r}。", f"{a}{word_zh}{b}等于{r}。", f"计算结果是{r}。"])
    else:
        human = rng.choice(
            [
                f"What is {a} {word_en} {b}?",
                f"Calculate {expr}.",
                f"How much is {a} {op} {b}?",
                f"Please compute {expr}.",
            ]
        )
        thought = f"The user wants to compute {expr}, so I should use the calculator."

        def reply(r):
            return rng.choice([f"{a} {word_en} {b} is {r}.", f"The result of {expr} is {r}.", f"{expr} = {r}."])

    return human, thought, "Calculate", expr, reply


def _word_problem(rng: random.Random, zh: bool) -> Problem:
    kind = rng.randrange(4)
    a, b = rng.randint(3, 40), rng.randint(2, 30)
    if kind == 0:
        expr = f"{a}*{b}"
        human = (
            f"一箱有{a}个苹果，{b}箱一共有多少个苹果？"
            if zh
            else f"A box holds {a} apples. How many apples are in {b} boxes?"
        )
        reply = (lambda r: f"{b}箱一共有{r}个苹果。") if zh else (lambda r: f"There are {r} apples in {b} boxes.")
    elif kind == 1:
        a = a + b
        expr = f"{a}-{b}"
        human = (
            f"小明有{a}元，花了{b}元，还剩多少元？"
            if zh
            else f"Tom has {a} dollars and spends {b} dollars. How much money does he have left?"
        )
        reply = (lambda r: f"小明还剩{r}元。") if zh else (lambda r: f"Tom has {r} dollars left.")
    elif kind == 2:
        total = a * b
        expr = f"{total}/{b}"
        human = (
            f"{total}块饼干平均分给{b}个人，每人分到几块？"
            if zh
            else f"{b} friends share {total} cookies equally. How many cookies does each friend get?"
        )
        reply = (lambda r: f"每人分到{r}块饼干。") if zh else (lambda r: f"Each friend gets {r} cookies.")
    else:
        expr = f"{a}^2"
        human = f"{a}的平方是多少？" if zh else f"What is {a} squared?"
        reply = (lambda r: f"{a}的平方是{r}。") if zh else (lambda r: f"{a} squared is {r}.")
    thought = (
        f"这是一道计算题，需要计算{expr}，我应该调用计算器。"
        if zh
        else f"This is an arithmetic problem: I need to compute {expr} with the calculator."
    )
    return human, thought, "Calculate", expr, reply


# ------------------------------------------------------------------- equation-solver problems
def _linear_equation(rng: random.Random, zh: bool) -> Problem:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 30), rng.randint(1, 50)
    equation = f"{a}x+{b}={a * x + b}"
    human = (
        rng.choice([f"解方程{equation}。", f"求解方程：{equation}"])
        if zh
        else rng.choice([f"Solve {equation}.", f"Find x if {equation}."])
    )
    thought = (
        f"这是一个方程问题，我需要调用方程求解器求解{equation}。"
        if zh
        else f"This is an equation, so I need the equation solver for {equation}."
    )
    reply = (lambda r: f"方程的解是{r}。") if zh else (lambda r: f"The solution is {r}.")
    return human, thought, "Solve", equation, reply


def _system(rng: random.Random, zh: bool) -> Problem:
    x, y = rng.randint(1, 60), rng.randint(1, 60)
    if x < y:
        x, y = y, x
    system = f"x+y={x + y};x-y={x - y}"
    if rng.random() < 0.5:
        human = (
            f"解方程组：x+y={x + y}，x-y={x - y}。" if zh else f"Solve the system x + y = {x + y} and x - y = {x - y}."
        )
    else:
        human = (
            f"两个数的和是{x + y}，差是{x - y}，这两个数分别是多少？"
            if zh
            else f"The sum of two numbers is {x + y} and their difference is {x - y}. What are the numbers?"
        )
    thought = (
        f"可以列出方程组{system}，我需要调用方程求解器。"
        if zh
        else f"I can set up the system {system} and use the equation solver."
    )
    reply = (
        (lambda r: f"解得{r.replace(chr(10), '，')}。")
        if zh
        else (lambda r: f"The numbers are {r.replace(chr(10), ' and ')}.")
    )
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
            human=human,
            inner_thoughts=thought,
            commands=command,
            results=[tool.result_line(argument, answer)],
            moss=reply(answer),
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


TRAIN_SEED = 0  # the training split's seed (moss-data sft --demo); the held-out split's is TRAIN_SEED + 10_007


def write_demo_dialogues(
    out_dir: str | Path, n_train: int = 4000, n_valid: int = 200, seed: int = TRAIN_SEED
) -> dict[str, Path]:
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
