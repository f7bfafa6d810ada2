"""Bradley-Terry, DPO and IPO losses and their gradients against hand computation; quantile
tagging; the quality tag in the prompt; pair records in every format, rendered."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moss_train import format as fmt
from moss_train import losses
from moss_train.data import pairs, parsing, rendering
from moss_train.stages.tag import conditioned_example, last_turn_only, quality_levels, quantile_thresholds


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_value_and_gradient_by_hand():
    chosen = torch.tensor([1.5, -0.2], requires_grad=True)
    rejected = torch.tensor([0.5, 0.3], requires_grad=True)
    margin = torch.tensor([0.0, 0.4])
    loss = losses.bradley_terry(chosen, rejected, margin)
    d = [1.5 - 0.5 - 0.0, -0.2 - 0.3 - 0.4]
    assert loss.tolist() == pytest.approx([-math.log(sigmoid(x)) for x in d], rel=1e-6)
    loss.sum().backward()
    # d/dc -log sigmoid(c - r - m) = -(1 - sigmoid(c - r - m)); d/dr = +(1 - sigmoid(...))
    assert chosen.grad.tolist() == pytest.approx([-(1 - sigmoid(x)) for x in d], rel=1e-6)
    assert rejected.grad.tolist() == pytest.approx([1 - sigmoid(x) for x in d], rel=1e-6)
    # A margin makes the same rewards cost more.
    assert losses.bradley_terry(torch.tensor(1.0), torch.tensor(0.0), 0.5) > losses.bradley_terry(
        torch.tensor(1.0), torch.tensor(0.0)
    )


def test_dpo_and_ipo_values_and_gradients_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0], requires_grad=True), torch.tensor([-12.0, -3.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    h = losses.log_ratio_difference(pc, pr, rc, rr)
    expected_h = [(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 3.5)]  # [1.5, 0.0]
    assert h.tolist() == pytest.approx(expected_h)
    beta = 0.2
    dpo = losses.dpo(h, beta, "sigmoid")
    assert dpo.tolist() == pytest.approx([-math.log(sigmoid(beta * x)) for x in expected_h], rel=1e-6)
    dpo.sum().backward()
    # d/d pc = -beta (1 - sigmoid(beta h)); d/d pr = +beta (1 - sigmoid(beta h))
    assert pc.grad.tolist() == pytest.approx([-beta * (1 - sigmoid(beta * x)) for x in expected_h], rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([beta * (1 - sigmoid(beta * x)) for x in expected_h], rel=1e-6)

    pc.grad = pr.grad = None
    h = losses.log_ratio_difference(pc, pr, rc, rr)
    ipo = losses.dpo(h, beta, "ipo")
    target = 1 / (2 * beta)  # 2.5
    assert ipo.tolist() == pytest.approx([(x - target) ** 2 for x in expected_h])
    ipo.sum().backward()
    assert pc.grad.tolist() == pytest.approx([2 * (x - target) for x in expected_h])
    assert pr.grad.tolist() == pytest.approx([-2 * (x - target) for x in expected_h])
    with pytest.raises(ValueError, match="unknown DPO loss"):
        losses.dpo(h, beta, "hinge")


def test_sequence_logps_sums_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[3, -100, 5, -100], [-100, -100, -100, 1]])
    logp = torch.log_softmax(logits, -1)
    expected = [logp[0, 0, 3] + logp[0, 2, 5], logp[1, 3, 1]]
    assert losses.sequence_logps(logits, labels).tolist() == pytest.approx([float(x) for x in expected], rel=1e-6)


SEQUENCE_LOGPS_MEMORY = r"""
import json, resource, sys
import torch
from moss_train import losses

torch.set_num_threads(1)
batch, length, vocab = 2, 1024, 107008  # MOSS's vocabulary, 2k tokens: fp32 logits of 0.84 GiB
generator = torch.Generator().manual_seed(0)
logits = torch.rand(batch, length, vocab, generator=generator).mul_(8)
labels = torch.randint(0, vocab, (batch, length), generator=generator)
labels[:, ::3] = -100
peak_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the high-water mark
with torch.no_grad():
    before = peak_kib()
    if sys.argv[1] == "lean":
        logps = losses.sequence_logps(logits, labels).double()
    else:  # the reference: one fp32 value per vocabulary entry and token
        picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).double()
        logps = torch.where(labels != -100, picked, 0.0).sum(dim=1)
    after = peak_kib()
print(
    json.dumps({"peak_mib": (after - before) / 1024, "logits_mib": logits.numel() * 4 / 2**20, "logps": logps.tolist()})
)
"""


def test_sequence_logps_peak_memory_is_a_fraction_of_the_full_log_softmax():
    """DPO's sequence log-probabilities go through the chunked token_cross_entropy: at MOSS's
    107k vocabulary and 2k tokens, their peak memory above the logits is under a quarter of what
    the full fp32 log_softmax adds (each measured as the peak RSS of a fresh process, whose
    high-water mark only the one computation moves), and the values equal the full log_softmax's."""
    import json
    import subprocess
    import sys

    from conftest import REPO, cli_env

    measured = {}
    for form in ("lean", "full"):
        result = subprocess.run(
            [sys.executable, "-c", SEQUENCE_LOGPS_MEMORY, form],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        measured[form] = json.loads(result.stdout.strip().splitlines()[-1])
    lean, full = measured["lean"], measured["full"]
    assert full["peak_mib"] > 0.9 * full["logits_mib"]  # the measurement sees the full buffer
    assert lean["peak_mib"] < 0.25 * full["peak_mib"], {form: m["peak_mib"] for form, m in measured.items()}
    assert lean["logps"] == pytest.approx(full["logps"], rel=1e-5)


def test_quantile_tagging():
    scores = np.arange(100, dtype=float)  # 0..99
    thresholds = quantile_thresholds(scores, 5)
    assert thresholds == pytest.approx([19.8, 39.6, 59.4, 79.2])
    levels = quality_levels(scores, thresholds)
    assert [levels.count(k) for k in range(1, 6)] == [20, 20, 20, 20, 20]  # equal shares
    assert quality_levels([-5.0, 19.8, 1000.0], thresholds) == [1, 2, 5]  # a cut point goes up
    assert quality_levels([0.1, 0.9], quantile_thresholds([0.0, 1.0], 3)) == [1, 3]


def test_the_quality_tag_enters_the_meta_instruction():
    meta = fmt.meta_instruction(["calculator"], preamble=fmt.SHORT_PREAMBLE)
    tagged = fmt.with_quality(meta, 5, 5)
    assert tagged == meta + "- Response quality: 5/5\n"
    assert fmt.enabled_plugins(tagged) == ["calculator"]  # the tools are still read right
    assert fmt.quality_line(2, 3, "<quality {level} of {levels}>\n") == "<quality 2 of 3>\n"
    with pytest.raises(ValueError):
        fmt.quality_line(6, 5)


def test_conditioned_example_trains_only_the_tagged_turn(tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    conversation = parsing.parse_record(record)
    example = conditioned_example(conversation, 1, 2, 3, fmt.QUALITY_TEMPLATE)
    assert example.dialogue.meta_instruction.endswith("- Response quality: 2/3\n")
    ids, flags = rendering.render(tokenizer, example)
    kept = last_turn_only(flags)
    second_turn = int(np.flatnonzero(flags & rendering.TURN_START)[1])
    assert (flags[:second_turn] & rendering.LOSS_DEFAULT).any()  # the first reply had loss before
    assert not (kept[:second_turn] & (rendering.LOSS_DEFAULT | rendering.LOSS_MOSS_REFERENCE)).any()
    assert (kept[second_turn:] == flags[second_turn:]).all()


@pytest.fixture(scope="module")
def tokenizer(pretrain_data):
    from moss_train.tokenizer import load_tokenizer

    return load_tokenizer(pretrain_data / "tokenizer")


def test_tag_reads_the_first_dialogues_of_a_file_with_bad_ones_counted(tmp_path):
    from moss_train.stages.tag import read_dialogues

    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [
        json.dumps(good),
        "{not json",
        "",
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
        json.dumps(good),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")

    records, conversations, rejects, read = read_dialogues(path)
    assert (len(records), len(conversations), read) == (2, 2, 4)  # the blank line is no record
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "invalid_json"), (4, "wrong_role_order")]

    records, conversations, rejects, read = read_dialogues(path, limit=3)
    assert (len(records), read, [r["line"] for r in rejects]) == (1, 3, [2, 4])  # the 4th record is not read
    assert read_dialogues(path, limit=1)[3] == 1


def test_pair_records_in_every_format(tokenizer):
    meta = fmt.meta_instruction()
    strings = pairs.parse_pair_record({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "margin": 2})
    messages = pairs.parse_pair_record(
        {
            "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
        }
    )
    hh = pairs.parse_pair_record(
        {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"}
    )
    for group in (strings, messages, hh):
        assert [fmt.render(c.dialogue) for c in group.conversations] == [
            fmt.render(fmt.Dialogue(meta, [fmt.Turn.from_text("What is 2+2?", answer)])) for answer in ("4", "5")
        ]
    assert strings.pairs == [(0, 1, 2.0)] and hh.pairs == [(0, 1, 0.0)]

    ranked = pairs.parse_pair_record({"prompt": "Q", "responses": ["a", "b", "c"]})
    assert ranked.pairs == [(0, 1, 1.0), (0, 2, 2.0), (1, 2, 1.0)]  # K=3 -> 3 pairs, best first
    scored = pairs.parse_pair_record({"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 2, 1]})
    assert sorted(scored.pairs) == [(1, 0, 1.0), (1, 2, 1.0)]  # ties make no pair

    multi = pairs.parse_pair_record(
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant: 22",
        }
    )
    (c_ids, c_flags), (r_ids, r_flags) = pairs.render_groups(tokenizer, [multi])[0]
    c_labels = pairs.response_labels(c_ids, c_flags)
    # The DPO labels cover the last reply only, never the first turn's reply.
    labelled = tokenizer.decode(c_ids[1:][c_labels[:-1] != -100].tolist())
    assert "4" in labelled and "Hello" not in labelled
    assert pairs.turn_ends(c_flags)[-1] == len(c_ids) - 1 and len(pairs.turn_ends(c_flags)) == 2

    tool = pairs.parse_pair_record(
        {
            "meta_instruction": fmt.meta_instruction(["calculator"]),
            "prompt": "2*3?",
            "responses": [
                {
                    "inner_thoughts": "calc",
                    "commands": 'Calculate("2*3")',
                    "results": ["Calculate(\"2*3\") => '6'"],
                    "moss": "6",
                },
                {"moss": "7"},
            ],
            "scores": [2, 0],
        }
    )
    turn = tool.conversations[0].dialogue.turns[0]
    assert (
        turn.commands == ' Calculate("2*3")'
        and turn.results == "\nCalculate(\"2*3\") => '6'\n"
        and turn.human == " 2*3?"
    )


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], parsing.NOT_AN_OBJECT),
        ({"prompt": "Q"}, parsing.UNKNOWN_FORMAT),
        ({"prompt": "Q", "chosen": "a", "rejected": "a"}, pairs.IDENTICAL_RESPONSES),
        ({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}, pairs.CONTEXTS_DIFFER),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, 1]}, pairs.NO_PAIR),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1]}, pairs.BAD_SCORES),
        ({"prompt": "Q", "responses": ["a"]}, pairs.NO_RESPONSES),
        ({"prompt": "Q", "chosen": 3, "rejected": "a"}, parsing.MALFORMED_FIELD),
        ({"chosen": "Human: no leading newlines", "rejected": "x"}, parsing.WRONG_ROLE_ORDER),  # no prompt at all
    ],
)
def test_bad_pair_records_are_rejected_by_reason(record, reason):
    with pytest.raises(parsing.RecordError) as error:
        pairs.parse_pair_record(record)
    assert error.value.reason == reason


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["stage=dpo", "data=pairs_demo", "preference.dpo_loss=hinge"], "preference.dpo_loss"),
        (["stage=dpo", "data=pairs_demo", "preference.beta=0"], "preference.beta"),
        (["stage=dpo", "data=pairs_demo"], "preference.reference"),  # no reference, no init_from
        (["stage=tag"], "preference.reward_model"),
        (["stage=tag", "preference.reward_model=.", "preference.tag_inputs=[a,b]"], "preference.tag_inputs"),
        (["stage=tag", "preference.levels=1"], "preference.levels"),
        (
            ["stage=tag", "preference.reward_model=.", "preference.tag_inputs=[README.md]", "preference.tag_limit=-1"],
            "preference.tag_limit",
        ),
        (
            ["stage=preference", "data=preference_demo", "preference.quality_template='quality {grade}'"],
            "preference.quality_template",
        ),
        (["stage=reward", "data=pairs_demo", "preference.margin_scale=-1"], "preference.margin_scale"),
    ],
)
def test_preference_recipes_are_validated_naming_the_key(overrides, key):
    from moss_train.config import compose, to_object, validate
    from moss_train.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate(to_object(compose(overrides)), world_size=1)
    assert error.value.key == key, error.value


def test_every_preference_stage_is_registered():
    from moss_train.stages import get_stage

    assert [get_stage(name).name for name in ("reward", "tag", "preference", "dpo")] == [
        "reward",
        "tag",
        "preference",
        "dpo",
    ]
