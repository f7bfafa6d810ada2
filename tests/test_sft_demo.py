"""The demo tool-use dialogues, the calculator and equation solver they call, and generation."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch

from data_pipelines.demo_dialogues import make_split, write_demo_dialogues
from moss_train import format as fmt
from moss_train.chat.generate import generate_batch
from moss_train.chat.plugins import NO_RESULT, TOOLS, calculate, parse_commands, run_commands, solve
from moss_train.data import parsing
from moss_train.eval.tool_use import JUDGE_MAX, check_reply, judge
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import ModelConfig


@pytest.mark.parametrize(
    "expression, answer",
    [
        ("24*15", "360"),
        ("125+389", "514"),
        ("907-21", "886"),
        ("3657/53", "69"),
        ("37^2", "1369"),
        ("2**10", "1024"),
        ("50/(2*7)", "3.571428571"),
        ("(12/2)*(2*6+(12-1)*3)", "270"),
        ("sqrt(16)+1.5", "5.5"),
        ("7÷2", "3.5"),
    ],
)
def test_calculator(expression, answer):
    assert calculate(expression) == answer


def test_equation_solver():
    assert solve("3x+5=20") == "x = 5"
    assert solve("x+y=500;5x+8y=4000") == "x = 0\ny = 500"
    assert solve("x/4=(120-x)/5") == "x = 160/3"
    assert solve("3x + 4x + 5x = 360; 3y = 6x; 6z = 5x") == "x = 30\ny = 60\nz = 25"
    for no_unique_answer in ("x+y=3", "x^2=4", "1=2", "2.5x+1.5y=50;x+y=?"):
        assert solve(no_unique_answer) == NO_RESULT


@pytest.mark.parametrize(
    "hostile",
    [
        "__import__('os').system('echo hi')",
        "9^9^9",
        "((((2^512)^512)^512)^512)",
        "(" * 200 + "1" + ")" * 200,
        "1" * 5000,
        "1/0",
        "x+1",
        "exec('1')",
        "lambda: 1",
    ],
)
def test_tools_never_run_code_or_hang(hostile):
    started = time.perf_counter()
    assert calculate(hostile) == NO_RESULT
    assert solve(f"{hostile}=x") in (NO_RESULT, "x = 1")
    assert time.perf_counter() - started < 2.0


def test_commands_are_parsed_and_run_in_the_moss003_layout():
    assert parse_commands(' Calculate("1+1") and Solve("x=2")') == [("Calculate", "1+1"), ("Solve", "x=2")]
    assert run_commands('Calculate("24*15")') == ["Calculate(\"24*15\") => '360'"]
    assert run_commands('Solve("x+y=10;x-y=2")') == ['Solve("x+y=10;x-y=2") =>\nx = 6\ny = 4']
    assert run_commands('Solve("x=1")', enabled={"calculator"}) == []  # the solver is not enabled


def test_demo_dialogues_really_ran_their_tools(tmp_path):
    paths = write_demo_dialogues(tmp_path, n_train=400, n_valid=60, seed=3)
    train = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    valid = [json.loads(line) for line in paths["valid"].read_text(encoding="utf-8").splitlines()]
    assert len(train) == 400 and len(valid) == 60
    tool_turns = checked = direct_answers = 0
    for record in train + valid:
        conversation = parsing.parse_record(record)  # valid moss-003 records
        for turn in conversation.dialogue.turns:
            for api, argument in parse_commands(turn.commands):
                # The results field is exactly what the tool returns now, and the reply states it.
                assert turn.results == fmt.results_body([TOOLS[api].result_line(argument)])
                answer = TOOLS[api].run(argument)
                assert answer != NO_RESULT
                assert all(value in turn.moss for value in (answer.split("\n") if api == "Solve" else [answer]))
                tool_turns += 1
        if "check" in record:
            first = conversation.dialogue.turns[0]
            enabled = set(fmt.enabled_plugins(conversation.dialogue.meta_instruction))
            # The tool is called, or (a direct answer) nothing is called: the result is right either way.
            verdict = check_reply(record["check"], first.commands, first.moss, enabled)
            direct_answers += verdict == (False, True) and first.commands == fmt.NONE_BODY
            assert verdict == (True, True) or (verdict == (False, True) and first.commands == fmt.NONE_BODY)
            checked += 1
    assert tool_turns > 250  # of ~470 problems; DIRECT_SHARE are answered without the tool
    assert 0.2 < direct_answers / checked < 0.4  # DIRECT_SHARE of the problems skip the enabled tool
    categories = Counter(parsing.parse_record(r).category for r in train)
    assert {"calculator", "equation_solver", "mix"} <= set(categories)
    assert {r["category"] for r in train} == {"demo_en", "demo_zh"}  # bilingual
    train_prompts = {r["chat"]["turn_1"]["Human"] for r in train if "check" in r}
    assert not train_prompts & {r["chat"]["turn_1"]["Human"] for r in valid if "check" in r}
    assert make_split(50, 3) == make_split(50, 3) != make_split(50, 4)


def test_check_reply_is_strict_about_command_and_result():
    check = {"command": 'Calculate("24*15")', "plugin": "calculator", "answer": ["360"]}
    enabled = {"calculator"}
    assert check_reply(check, ' Calculate("15*24")', "It is 360.", enabled) == (True, True)  # same result
    assert check_reply(check, ' Calculate("24+15")', "It is 3600.", enabled) == (False, False)
    assert check_reply(check, ' Calculate("24*15")', "It is 360.", set()) == (False, True)  # tool not enabled


def test_the_demo_judge_credits_the_tool_the_command_and_the_result():
    record = {
        "meta_instruction": fmt.meta_instruction(["calculator"]),
        "check": {"command": 'Calculate("24*15")', "plugin": "calculator", "answer": ["360"]},
    }

    def score(commands, reply):
        return judge(record, commands, reply)

    assert score('Calculate("15*24")', "It is 360.") == JUDGE_MAX == 3
    assert score('Calculate("24*15")', "I do not know.") == 2  # right command, result not stated
    assert score('Calculate("24*16")', "It is 384.") == 1  # the right tool, a digit copied wrong
    assert score(None, "It is 350.") == 0  # a guess without the tool
    assert score(None, "It is 360.") == 1  # a lucky guess states the result
    assert score('Solve("x=360")', "It is 360.") == 1  # the solver is not enabled here: only the result counts


def test_batched_generation_equals_one_prompt_at_a_time():
    torch.manual_seed(0)
    model = CodeGenForCausalLM(
        ModelConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
    ).eval()
    prompts = [[5, 9, 11, 3, 7, 20, 21], [4, 4], [30, 31, 32, 33]]
    batched = generate_batch(model, prompts, max_new_tokens=6, stop_ids=(17,), pad_id=0)
    alone = [generate_batch(model, [p], max_new_tokens=6, stop_ids=(17,), pad_id=0)[0] for p in prompts]
    assert batched == alone
    # Greedy is the argmax continuation of the prompt, step by step.
    ids = list(prompts[1])
    for token in alone[1]:
        assert token == int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
    sampled = generate_batch(model, prompts, 6, pad_id=0, temperature=1.0, top_k=5, seed=1)
    assert sampled == generate_batch(model, prompts, 6, pad_id=0, temperature=1.0, top_k=5, seed=1)
