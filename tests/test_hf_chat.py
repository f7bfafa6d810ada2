"""An export chats and calls tools in plain transformers, as HF chat models do.

- the chat template (generated from moss_train/format.py) renders every moss-003 sample
  dialogue and every demo dialogue token for token as SFT does, tool turns as HF tool_calls +
  tool messages wherever that form can say the same;
- without a system message it writes the meta instruction the model was trained with, `tools`
  enabling their capability lines, the best tag for a tag-conditioned model; a system message
  replaces it; add_generation_prompt appends the field the model writes next;
- the docs' two-pass example (transformers + the calculator) runs on an exported model, stops at
  <eoc> for the tool, and gives what moss-train's own two-pass protocol gives.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import transformers

from moss_train import format as fmt
from moss_train.checkpoint import chat_template as ct
from moss_train.data import parsing
from moss_train.tokenizer import MossTokenizer

from conftest import BIN, REPO, run_cli

SHARED = Path(os.environ.get("MOSS_SHARED_DIR", REPO.parent / "shared"))
SAMPLE = SHARED / "data" / "moss-003-sft-sample" / "conversations.jsonl"
SHORT = ct.ChatFormat(fmt.SHORT_PREAMBLE)
CALCULATOR, SOLVER = ct.tool_schema("calculator"), ct.tool_schema("equation_solver")


@pytest.fixture(scope="module")
def tokenizers(pretrain_data, tmp_path_factory):
    """(HF tokenizer with the template of a model trained on the short preamble, MOSS's own)."""
    ours = MossTokenizer.load(pretrain_data / "tokenizer")
    directory = ours.save_pretrained(
        tmp_path_factory.mktemp("tok"), extra_config={"chat_template": ct.build_chat_template(SHORT)}
    )
    return transformers.AutoTokenizer.from_pretrained(directory), ours


def trained_ids(tokenizer, segments) -> list[int]:
    return [i for ids in fmt.encode_segments(tokenizer, segments) for i in ids]


def check_dialogues(dialogues, tokenizers) -> tuple[int, int]:
    """Template text and ids == the format's for each dialogue; (HF-form tool turns, MOSS-field turns)."""
    hf, ours = tokenizers
    hf_form = moss_fields = 0
    for dialogue in dialogues:
        messages = ct.messages_from_dialogue(dialogue)
        assert hf.apply_chat_template(messages, tokenize=False) == fmt.render(dialogue) == ct.render_messages(messages)
        assert hf.apply_chat_template(messages)["input_ids"] == trained_ids(ours, fmt.dialogue_segments(dialogue))
        assert ct.dialogue_from_messages(messages).turns == dialogue.turns
        hf_form += sum(1 for m in messages if m.get("tool_calls"))
        moss_fields += sum(1 for m in messages if "commands" in m or "results" in m)
    return hf_form, moss_fields


def test_every_moss003_sample_dialogue_renders_token_for_token(tokenizers):
    if not SAMPLE.is_file():
        pytest.skip(f"the shared moss-003 sample is not at {SAMPLE} (set MOSS_SHARED_DIR)")
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    hf_form, moss_fields = check_dialogues([parsing.parse_record(r).dialogue for r in records], tokenizers)
    print(
        f"moss-003 sample: {len(records)} dialogues; "
        f"tool turns as HF tool_calls: {hf_form}, as MOSS fields: {moss_fields}"
    )
    # MOSS fields only where moss-003's own data breaks its layout ("<|Results|>:\nNone\n" with no
    # command, text-to-image results without the command line).
    assert len(records) == 550 and hf_form >= 350 and moss_fields <= 120


def test_every_demo_dialogue_renders_token_for_token_with_hf_tool_calls(tokenizers):
    from data_pipelines.demo_dialogues import make_split

    dialogues = [parsing.parse_record(r).dialogue for r in make_split(300, seed=7)]
    hf_form, moss_fields = check_dialogues(dialogues, tokenizers)
    tool_turns = sum(1 for d in dialogues for t in d.turns if t.commands != fmt.NONE_BODY)
    assert hf_form == tool_turns > 150 and moss_fields == 0  # every tool turn in the HF form


def test_default_meta_tools_tool_messages_and_generation_prompts(tokenizers):
    hf, ours = tokenizers
    question = [{"role": "user", "content": "What is 23 times 17?"}]
    calculator_meta = fmt.meta_instruction(["calculator"], preamble=fmt.SHORT_PREAMBLE)
    pass_one = hf.apply_chat_template(question, tools=[CALCULATOR], add_generation_prompt=True, tokenize=False)
    assert pass_one == calculator_meta + "<|Human|>: What is 23 times 17?<eoh>\n<|Inner Thoughts|>:"
    # Without tools: the capability lines the model saw for tool-less dialogues.
    assert (
        hf.apply_chat_template(question, tokenize=False)
        == fmt.meta_instruction(preamble=fmt.SHORT_PREAMBLE) + "<|Human|>: What is 23 times 17?<eoh>\n"
    )
    # Tools (named by command or plugin) enable their lines, in moss-003's order.
    both = fmt.meta_instruction(["calculator", "equation_solver"], preamble=fmt.SHORT_PREAMBLE)
    by_plugin_name = {"type": "function", "function": {**CALCULATOR["function"], "name": "calculator"}}
    assert hf.apply_chat_template(question, tools=[SOLVER, by_plugin_name], tokenize=False).startswith(both)

    calls = question + [
        {
            "role": "assistant",
            "content": "I should use the calculator.",
            "tool_calls": [
                {"type": "function", "function": {"name": "Calculate", "arguments": {"expression": "23*17"}}},
                {"type": "function", "function": {"name": "Solve", "arguments": {"equation": "x+1=2"}}},
            ],
        },
        {"role": "tool", "content": "391"},
        {"role": "tool", "content": "x = 1"},
    ]
    pass_two = hf.apply_chat_template(calls, tools=[CALCULATOR, SOLVER], add_generation_prompt=True, tokenize=False)
    tool_turn = fmt.Turn.from_text(
        "What is 23 times 17?",
        "",
        inner_thoughts="I should use the calculator.",
        commands='Calculate("23*17"), Solve("x+1=2")',
        results=["Calculate(\"23*17\") => '391'", 'Solve("x+1=2") =>\nx = 1'],
    )
    full = fmt.render(fmt.Dialogue(both, [tool_turn]))
    assert pass_two == full[: full.index("<|MOSS|>:") + len("<|MOSS|>:")]
    assert pass_two == ct.render_messages(calls, tools=[CALCULATOR, SOLVER], add_generation_prompt=True, chat=SHORT)
    segments = ct.message_segments(calls, tools=[CALCULATOR, SOLVER], add_generation_prompt=True, chat=SHORT)
    assert hf.apply_chat_template(calls, tools=[CALCULATOR, SOLVER], add_generation_prompt=True)[
        "input_ids"
    ] == trained_ids(ours, segments)
    # The reply closes the turn; a turn without tools renders MOSS's None fields.
    done = calls + [
        {"role": "assistant", "content": "It is 391."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    rendered = hf.apply_chat_template(done, tools=[CALCULATOR, SOLVER], tokenize=False)
    assert rendered.endswith(
        "<|MOSS|>: It is 391.<eom>\n<|Human|>: Thanks!<eoh>\n<|Inner Thoughts|>: None<eot>\n"
        "<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>: You are welcome.<eom>\n"
    )
    # A system message replaces the default meta instruction, verbatim.
    system = [{"role": "system", "content": "You are MOSS.\n"}, *question]
    assert hf.apply_chat_template(system, tokenize=False) == "You are MOSS.\n<|Human|>: What is 23 times 17?<eoh>\n"


@pytest.mark.parametrize(
    "messages, tools, message",
    [
        (
            [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}],
            [CALCULATOR],
            "whole meta instruction",
        ),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "1"}], None, "answers the tool_calls"),
        (
            [{"role": "user", "content": "q"}],
            [{"type": "function", "function": {"name": "Translate"}}],
            "unknown tool Translate",
        ),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], None, "complete assistant turn"),
        (
            [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "Calculate", "arguments": "{}"}}],
                },
            ],
            None,
            "one argument, as a mapping",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "Calculate", "arguments": {"expression": "1"}}}],
                },
            ],
            None,
            "run the tool calls first",
        ),
    ],
)
def test_what_the_format_cannot_say_is_an_error_naming_the_rule(tokenizers, messages, tools, message):
    hf, _ = tokenizers
    with pytest.raises(Exception, match=message):
        hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    with pytest.raises(ct.ChatTemplateError, match=message):
        ct.render_messages(messages, tools=tools, add_generation_prompt=True, chat=SHORT)


def test_a_tag_conditioned_model_is_asked_for_its_best_tag():
    form = {"levels": 5, "template": "- Response quality: {level}/{levels}\n", "thresholds": [0.1, 0.2, 0.3, 0.4]}
    trained_meta = fmt.with_quality(fmt.meta_instruction(["calculator"], preamble=fmt.SHORT_PREAMBLE), 2, 5)
    chat = ct.ChatFormat.from_meta_instruction(trained_meta, form)  # any tag the training data had
    assert chat == ct.ChatFormat(fmt.SHORT_PREAMBLE, quality=form)
    expected = fmt.with_quality(fmt.meta_instruction(["equation_solver"], preamble=fmt.SHORT_PREAMBLE), 5, 5)
    messages = [{"role": "user", "content": "hi"}]
    rendered = ct.render_messages(messages, tools=["Solve"], chat=chat)
    assert rendered == expected + "<|Human|>: hi<eoh>\n"
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ct.ChatTemplateError(message)

    template = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(
        ct.build_chat_template(chat)
    )
    assert template.render(messages=messages, tools=["Solve"], raise_exception=raise_exception) == rendered
    # A model trained without capability lines keeps its meta instruction and takes no tools.
    plain = ct.ChatFormat.from_meta_instruction("You are a helpful assistant.\n")
    assert (
        not plain.capabilities
        and ct.render_messages(messages, chat=plain) == "You are a helpful assistant.\n<|Human|>: hi<eoh>\n"
    )
    with pytest.raises(ct.ChatTemplateError, match="without capability lines"):
        ct.render_messages(messages, tools=["Solve"], chat=plain)


# ---------------------------------------------------------------------------- the two-pass example
PROBLEMS = [
    ("What is 23 times 17?", "23*17"),
    ("How much is 91 minus 38?", "91-38"),
    ("Calculate 64 divided by 4.", "64/4"),
    ("What is 45 plus 27?", "45+27"),
]


def calculator_records() -> list[dict]:
    """Calculator dialogues whose tool really ran, with the demo data's short preamble."""
    from moss_train.chat.plugins import Calculator

    meta = fmt.meta_instruction(["calculator"], preamble=fmt.SHORT_PREAMBLE)
    records = []
    for i, (question, expression) in enumerate(PROBLEMS):
        call = Calculator().call(expression)
        turn = fmt.Turn.from_text(
            question,
            f"{expression} = {call.answer}.",
            inner_thoughts="I should use the calculator.",
            commands=fmt.command("Calculate", expression),
            results=[call.line],
        )
        records.append(
            {
                "conversation_id": i,
                "meta_instruction": meta,
                "num_turns": 1,
                "chat": {"turn_1": {spec.key: spec.render(turn.body(spec.role)) for spec in fmt.FIELDS}},
            }
        )
    return records


@pytest.fixture(scope="module")
def calculator_export(pretrain_data, tmp_path_factory):
    """A tiny model that learned four calculator dialogues by heart (100 SFT steps), exported."""
    from moss_train.checkpoint.export import export_checkpoint

    root = tmp_path_factory.mktemp("calculator")
    (root / "dialogues.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calculator_records()))
    tokenizer = str(pretrain_data / "tokenizer")
    run_cli(
        [
            "sft",
            "--input",
            str(root / "dialogues.jsonl"),
            "--valid-input",
            str(root / "dialogues.jsonl"),
            "--tokenizer",
            tokenizer,
            "--out",
            str(root / "data"),
        ],
        launcher=[str(BIN / "moss-data")],
    )
    overrides = {
        "stage": "sft",
        "data": "sft_demo",
        "data.root": root / "data",
        "data.tokenizer": tokenizer,
        "data.seq_len": 320,
        "model": "tiny",
        "model.n_embd": 64,
        "model.rotary_dim": 8,
        "run.output_dir": root / "run",
        "sft.packing": "padded",
        "trainer.micro_batch_size": 4,
        "trainer.global_batch_size": 4,
        "trainer.max_steps": 100,
        "trainer.warmup_steps": 5,
        "trainer.lr": 3e-3,
        "trainer.precision": "fp32",
        "trainer.eval_samples": 4,
        "trainer.log_every": 50,
        "logging.wandb": "disabled",
        "logging.progress_bar": "false",
    }
    run_cli([f"{key}={value}" for key, value in overrides.items()])
    export_checkpoint(root / "run", root / "hf")
    return root / "hf"


@pytest.mark.slow  # trains its calculator model: ~22 s quiet
def test_the_docs_two_pass_example_calls_the_calculator_with_transformers_alone(calculator_export):
    from moss_train.chat.plugins import build_plugins
    from moss_train.chat.protocol import ChatSession, Settings
    from moss_train.checkpoint.export import load_model
    from moss_train.tokenizer import load_tokenizer

    question = "What is 23 times 17?"
    result = run_cli(
        [str(REPO / "docs" / "hf_tool_chat.py"), str(calculator_export), question], launcher=[sys.executable]
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("pass one:", "tool:", "reply:"))]
    print("\n".join(lines))
    assert lines == [
        # stopped for the tool
        "pass one: ' I should use the calculator.<eot>\\n<|Commands|>: Calculate(\"23*17\")<eoc>'",
        "tool: Calculate('23*17') -> '391'",
        "reply: 23*17 = 391.",
    ]
    # moss-train's own two-pass protocol on the same export writes the same turn.
    session = ChatSession(
        load_model(calculator_export),
        load_tokenizer(calculator_export),
        build_plugins("calculator"),
        Settings(max_new_tokens=64),
        preamble=fmt.SHORT_PREAMBLE,
    )
    turn = session.ask(question)
    assert (turn.inner_thoughts, turn.commands, turn.results, turn.reply) == (
        " I should use the calculator.",
        ' Calculate("23*17")',
        ["Calculate(\"23*17\") => '391'"],
        "23*17 = 391.",
    )


@pytest.mark.parametrize("scheme, layer", [("int8", "Linear8bitLt"), ("int4", "Linear4bit")])
def test_quantized_exports_load_in_transformers_and_still_call_the_tool(
    calculator_export, tmp_path, scheme, layer, capsys
):
    from moss_train.checkpoint.export import export_checkpoint

    out = tmp_path / scheme
    export_checkpoint(calculator_export.parent / "run", out, quantize=scheme)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")) == ["model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model.transformer.h[0].attn.qkv_proj).__name__ == layer and type(model.lm_head).__name__ == "Linear"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        qkv = handle.get_tensor("transformer.h.0.attn.qkv_proj.weight")
    assert qkv.numel() * qkv.element_size() == 3 * 64 * 64 // (
        1 if scheme == "int8" else 2
    )  # a byte, or half, per weight
    example = runpy.run_path(str(REPO / "docs" / "hf_tool_chat.py"))  # the docs' example, in this process
    example["main"](str(out), "What is 23 times 17?")
    printed = capsys.readouterr().out
    assert "tool: Calculate('23*17') -> '391'" in printed and "reply: 23*17 = 391." in printed
    from moss_train.checkpoint.export import load_model
    from moss_train.checkpoint.store import CheckpointError

    with pytest.raises(CheckpointError, match="quantized .bitsandbytes. export is for inference in transformers"):
        load_model(out)  # moss-train itself (moss-chat, stage.init_from) reads full-precision weights only
