"""The preference stages for real, each on two processes under ZeRO-3: moss-data pairs (every
format, rejects counted), stage=reward learning a synthetic preference to > 90% held-out
accuracy, stage=tag scoring dialogues with that reward model (sharded, gathered, tagged by
quantile), stage=preference on the tagged data, stage=dpo with its frozen reference. And the
evidence that the stages do what they are for: asked for the best tag, the tag-conditioned model
answers as the reward model prefers (and more than asked for the worst); so does the DPO model,
against its start."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BIN, free_port, read_metrics, run_cli, train_losses, train_overrides

WORDS = "apple river green stone quick blue table light music window paper cloud garden winter little bright".split()


def reply(rng: random.Random, polite: bool) -> str:
    """Random words; the preferred replies contain "please" somewhere, the others never do."""
    words = rng.choices(WORDS, k=rng.randint(4, 9))
    if polite:
        words.insert(rng.randrange(len(words) + 1), "please")
    return " ".join(words)


def pair_records(n: int, seed: int) -> list[dict]:
    """The same preference in the formats moss-data pairs reads, in turn."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = f"Tell me about the {rng.choice(WORDS)} {rng.choice(WORDS)}."
        good, bad = reply(rng, True), reply(rng, False)
        kind = i % 4
        if kind == 0:
            records.append({"prompt": prompt, "chosen": good, "rejected": bad})
        elif kind == 1:
            records.append(
                {
                    "chosen": f"\n\nHuman: {prompt}\n\nAssistant: {good}",
                    "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {bad}",
                }
            )
        elif kind == 2:
            user = {"role": "user", "content": prompt}
            records.append(
                {
                    "chosen": [user, {"role": "assistant", "content": good}],
                    "rejected": [user, {"role": "assistant", "content": bad}],
                }
            )
        else:  # a ranked list of 3: two good ones above a bad one (1 tie -> 2 pairs)
            records.append(
                {"prompt": prompt, "responses": [good, reply(rng, False), reply(rng, True)], "scores": [1, 0, 1]}
            )
    return records


SYSTEM = "You are an AI assistant whose name is MOSS.\n"  # short, so pairs fit in 128 tokens
BAD_LINES = [
    '{"prompt": "Q", "chosen": "same", "rejected": "same"}',
    "{not json",
    '{"prompt": "Q", "responses": ["a", "b"], "scores": [2, 2]}',
]


@pytest.fixture(scope="module")
def pair_data(pretrain_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    for name, records, extra in (("train", pair_records(240, 0), BAD_LINES), ("valid", pair_records(48, 1), [])):
        lines = [json.dumps(r) for r in records] + extra
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(
        [
            "pairs",
            "--input",
            str(root / "train.jsonl"),
            "--valid-input",
            str(root / "valid.jsonl"),
            "--tokenizer",
            str(pretrain_data / "tokenizer"),
            "--out",
            str(root / "out"),
            "--meta-instruction",
            SYSTEM,
        ],
        launcher=[str(BIN / "moss-data")],
    )
    assert "pairs: 291 records -> 288 response groups, 3 rejected" in result.stdout
    return root / "out"


def test_pairs_are_rendered_with_every_reject_counted(pair_data):
    summary = json.loads((pair_data / "summary.json").read_text())
    assert summary["rejected_by_reason"] == {"identical_responses": 1, "invalid_json": 1, "no_pair": 1}
    assert summary["records_in"] == summary["groups_written"] + summary["rejected"]
    rejects = [json.loads(line) for line in (pair_data / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["identical_responses", "invalid_json", "no_pair"]
    # 240 records: 180 single pairs + 60 ranked lists of 3 responses with 2 pairs each.
    assert summary["shards"]["train"] == {
        **summary["shards"]["train"],
        "responses": 180 * 2 + 60 * 3,
        "pairs": 180 + 60 * 2,
    }
    index = np.load(pair_data / "shards" / "train.pairs.npy")
    assert index.shape == (300, 3) and (index[:, 0] != index[:, 1]).all()


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "moss_train"]


def stage_overrides(pretrain_data, out, **extra) -> list[str]:
    settings = {
        "deepspeed": "zero3",
        "data.tokenizer": str(pretrain_data / "tokenizer"),
        "data.seq_len": 128,
        "trainer.micro_batch_size": 4,
    }
    settings.update(extra)
    return train_overrides(pretrain_data, out, **settings)


@pytest.fixture(scope="module")
def reward_run(pretrain_data, pair_data, tmp_path_factory):
    """Two processes, ZeRO-3, from scratch: the reward model learns "please" is preferred."""
    out = tmp_path_factory.mktemp("reward")
    run_cli(
        stage_overrides(
            pretrain_data,
            out,
            **{
                "stage": "reward",
                "data": "pairs_demo",
                "data.root": str(pair_data),
                "trainer.max_steps": 24,
                "trainer.global_batch_size": 16,
                "trainer.lr": 3e-3,
                "trainer.warmup_steps": 4,
                "trainer.eval_samples": 48,
                "trainer.log_every": 8,
            },
        ),
        launcher=torchrun(),
        timeout=400,
    )
    return out


def test_reward_model_learns_a_preference_on_two_processes(reward_run):
    records = train_losses(reward_run)
    assert records[24]["loss"] < records[8]["loss"]
    final = [r for r in read_metrics(reward_run) if "eval_accuracy" in r][-1]
    assert final["eval_accuracy"] > 0.9, final  # held-out pairs ranked right
    assert final["eval_margin"] > 0
    report = json.loads((reward_run / "pair_data.json").read_text())
    assert report["train"] == {"pairs": 300, "kept": 300, "skipped": {"too_long": 0}}


def test_the_reward_run_exports_and_scores_as_trained(reward_run, pretrain_data, tmp_path):
    """moss-export on the stage=reward run (two ranks, ZeRO-3): the export loads in the project's
    loader (checkpoint.export.load_model) and in plain transformers (the backbone, then the
    documented score head by hand), and both score dialogues as the run's consolidated weights
    do; the learned preference ("please") comes along."""
    import transformers
    from safetensors import safe_open

    from moss_train.checkpoint.cli import main as export_main
    from moss_train.checkpoint.export import REWARD, load_model
    from moss_train.checkpoint.sources import MossTrainCheckpoint
    from moss_train.data import parsing, rendering
    from moss_train.model.reward import RewardModel
    from moss_train.tokenizer import load_tokenizer

    hf_dir = tmp_path / "hf-reward"
    assert export_main([str(reward_run), str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["CodeGenModel"] and config["moss_reward"]["head"] == "score"
    assert not (hf_dir / "generation_config.json").exists()
    source = MossTrainCheckpoint(reward_run)
    trained = RewardModel(source.model_config).eval()
    trained.load_state_dict({n: source.tensor(n) for n in source.names})
    exported = load_model(hf_dir, REWARD)
    backbone = transformers.AutoModel.from_pretrained(hf_dir, trust_remote_code=False).eval()
    with safe_open(str(next(hf_dir.glob("*.safetensors"))), framework="pt") as handle:
        weight, bias = handle.get_tensor("score.weight"), handle.get_tensor("score.bias")
    tokenizer = load_tokenizer(hf_dir)
    rng = random.Random(7)
    scores = {True: [], False: []}
    for i in range(8):
        polite = i % 2 == 0
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}."},
            {"role": "assistant", "content": reply(rng, polite)},
        ]
        ids, _ = rendering.render(tokenizer, parsing.parse_record({"messages": messages}))
        x = torch.from_numpy(ids)[None]
        with torch.no_grad():
            ours, theirs = exported(x), trained(x)
            plain = backbone(x).last_hidden_state[:, -1] @ weight.T + bias
        assert torch.equal(ours, theirs), i
        assert float(plain[0, 0]) == pytest.approx(float(ours[0]), rel=1e-5, abs=1e-6), i
        scores[polite].append(float(ours[0]))
    assert min(scores[True]) > max(scores[False]), scores  # the trained preference, not a fresh head


def dialogues(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}."},
            {"role": "assistant", "content": reply(rng, i % 2 == 0)},
        ]
        if i % 5 == 0:  # a second turn, tagged on its own
            messages += [
                {"role": "user", "content": "And more?"},
                {"role": "assistant", "content": reply(rng, i % 2 == 1)},
            ]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def tag_run(pretrain_data, reward_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("tag")
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    train.write_text(
        "\n".join(json.dumps(d) for d in dialogues(60, 3)) + '\n{"messages": [{"role": "assistant", "content": "x"}]}\n'
    )
    valid.write_text("\n".join(json.dumps(d) for d in dialogues(12, 4)) + "\n")
    out = root / "run"
    run_cli(tag_overrides(pretrain_data, reward_run, root, out), launcher=torchrun(), timeout=300)
    return out


def tag_overrides(pretrain_data, reward_run, inputs: Path, out: Path) -> list[str]:
    """stage=tag of inputs/{train,valid}.jsonl with the reward model, in three levels."""
    return stage_overrides(
        pretrain_data,
        out,
        **{
            "stage": "tag",
            "preference.reward_model": str(reward_run),
            "preference.levels": 3,
            "data.seq_len": 256,
            "preference.tag_inputs": f"[{inputs / 'train.jsonl'},{inputs / 'valid.jsonl'}]",
        },
    )


def test_tag_scores_every_turn_with_the_reward_model_on_two_processes(tag_run, reward_run, pretrain_data):
    summary = json.loads((tag_run / "thresholds.json").read_text())
    assert summary["levels"] == 3 and len(summary["thresholds"]) == 2
    train = summary["files"]["train"]
    # 60 dialogues, 12 of them two turns; one record rejected (no user turn), and counted.
    assert train["records_in"] == 61 and train["records_tagged"] == 60 and train["rejected"] == 1
    assert train["turns_tagged"] == 72 and train["turns_untagged"] == 0
    assert sum(train["per_level"].values()) == 72 and abs(train["per_level"]["1"] - 24) <= 1  # equal thirds
    rejects = [json.loads(line) for line in (tag_run / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["wrong_role_order"]

    tagged = [json.loads(line) for line in (tag_run / "tagged" / "train.jsonl").read_text().splitlines()]
    assistant = [m for d in tagged for m in d["messages"] if m["role"] == "assistant"]
    assert all(m["quality"] in (1, 2, 3) for m in assistant)
    polite = [m["quality"] for m in assistant if "please" in m["content"].split()]
    rude = [m["quality"] for m in assistant if "please" not in m["content"].split()]
    assert np.mean(polite) > np.mean(rude) + 1  # the learned preference, as tags

    # The sharded, gathered scores are the reward model's own, in the right order.
    from moss_train.checkpoint.export import REWARD, load_model
    from moss_train.data import parsing, rendering
    from moss_train.tokenizer import load_tokenizer

    model, tokenizer = load_model(reward_run, REWARD), load_tokenizer(pretrain_data / "tokenizer")
    for record in tagged[:3] + tagged[-3:]:
        original = {"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]}
        ids, _ = rendering.render(tokenizer, parsing.parse_record(original))
        with torch.no_grad():
            last = float(model(torch.from_numpy(ids)[None])[0])
        assert last == pytest.approx(record["messages"][-1]["reward"], abs=1e-4)


def test_one_process_tags_as_two_processes_do(tag_run, reward_run, pretrain_data, tmp_path):
    """The reward model as a frozen model in one process (ZeRO-3 runs as ZeRO-2 there, and a
    frozen model as no ZeRO at all: engine/setup.py) gives the rewards, thresholds and tags of
    the two-process ZeRO-3 run."""
    out = tmp_path / "run"
    run_cli(tag_overrides(pretrain_data, reward_run, tag_run.parent, out), timeout=300)
    one, two = (json.loads((run / "thresholds.json").read_text()) for run in (out, tag_run))
    assert one["thresholds"] == pytest.approx(two["thresholds"], abs=1e-5)
    assert one["files"]["train"]["per_level"] == two["files"]["train"]["per_level"]

    def tagged(run):
        return [
            (m["reward"], m["quality"])
            for line in (run / "tagged" / "train.jsonl").read_text().splitlines()
            for m in json.loads(line)["messages"]
            if m["role"] == "assistant"
        ]

    ours, theirs = tagged(out), tagged(tag_run)
    assert len(ours) == len(theirs) == 72
    assert [q for _, q in ours] == [q for _, q in theirs]
    assert [r for r, _ in ours] == pytest.approx([r for r, _ in theirs], abs=1e-5)


@pytest.fixture(scope="module")
def preference_run(pretrain_data, tag_run, tmp_path_factory):
    """Tag-conditioned SFT on two processes, from scratch, long enough (200 steps) to learn what
    the tag asks for."""
    out = tmp_path_factory.mktemp("preference")
    overrides = preference_overrides(pretrain_data, tag_run, out, **{"trainer.max_steps": 200})
    result = run_cli(overrides, launcher=torchrun(), timeout=300)
    return out, result.stdout


def preference_overrides(pretrain_data, tag_run, out, **extra) -> list[str]:
    """stage=preference on the tag run's conditioned shards (lr 3e-3, 256 tokens), plus `extra`."""
    settings = {
        "stage": "preference",
        "data": "preference_demo",
        "data.root": str(tag_run / "conditioned"),
        "data.train_shards": "[shards/train.*]",
        "data.valid_shards": "[shards/valid.*]",
        "trainer.lr": 3e-3,
        "data.seq_len": 256,
    }
    return stage_overrides(pretrain_data, out, **{**settings, **extra})


def test_preference_trains_on_the_tagged_dialogues_on_two_processes(pretrain_data, tag_run, preference_run):
    from moss_train.data.shards import open_shards
    from moss_train.tokenizer import load_tokenizer

    shards = open_shards(
        sorted(str(p)[: -len(".json")] for p in (tag_run / "conditioned" / "shards").glob("train.*.json"))
    )
    tokenizer = load_tokenizer(pretrain_data / "tokenizer")
    assert sum(len(s) for s in shards) == 72  # one example per tagged turn
    text = tokenizer.decode(shards[0].document(0).tolist())
    assert "- Response quality: " in text and "/3" in text

    out, stdout = preference_run
    assert "sft train: 72/72 conversations" in stdout
    quality = json.loads((out / "quality.json").read_text())
    assert quality["levels"] == 3 and quality["template"] == "- Response quality: {level}/{levels}\n"
    records = train_losses(out)
    assert records[3]["loss"] < records[1]["loss"]


@pytest.mark.slow  # a two-rank LoRA run: ~10 s quiet
def test_preference_with_lora_trains_adapters_only(pretrain_data, tag_run, tmp_path):
    """stage=preference with LoRA on an HF base: the adapters alone train and are saved, and the
    merged export carries the tag form like any preference export."""
    from test_export import random_hf_codegen

    from moss_train.checkpoint.export import export_checkpoint
    from moss_train.checkpoint.sources import MossTrainCheckpoint
    from moss_train.model import lora
    from moss_train.tokenizer import MossTokenizer

    base, out = tmp_path / "base", tmp_path / "run"
    random_hf_codegen(
        1024, seed=2, n_positions=256, n_ctx=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8
    ).save_pretrained(base)
    MossTokenizer.load(pretrain_data / "tokenizer").save_pretrained(base)
    lora_run = {"stage.init_from": str(base), "lora.r": 4, "trainer.max_steps": 3}
    result = run_cli(preference_overrides(pretrain_data, tag_run, out, **lora_run))
    assert "LoRA r=4 alpha=16.0 on qkv_proj, out_proj, fc_in, fc_out: 8,192 trainable parameters" in result.stdout
    records = train_losses(out)
    assert records[3]["loss"] < records[1]["loss"]
    assert all(lora.is_adapter(name) for name in MossTrainCheckpoint(out).names)
    export_checkpoint(out, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "quality.json").read_text()) == json.loads((out / "quality.json").read_text())


def test_the_tag_form_travels_to_the_export_and_moss_chat_asks_for_the_best(preference_run, tmp_path):
    from moss_train import format as fmt
    from moss_train.chat.cli import choose_quality
    from moss_train.checkpoint.export import export_checkpoint

    out, _ = preference_run
    step_dir = sorted((out / "checkpoints").glob("step_*"))[-1]
    form = fmt.find_quality_form(step_dir)  # found two directories up, in the run
    assert form == json.loads((out / "quality.json").read_text())
    export_checkpoint(out, tmp_path / "hf")
    assert fmt.find_quality_form(tmp_path / "hf") == form
    # Its chat template asks for the best tag, in the meta instruction the training data had
    # (SYSTEM: no capability lines).
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    best = fmt.with_quality(SYSTEM, form["levels"], form["levels"], form["template"])
    assert prompt == best + "<|Human|>: hi<eoh>\n"
    assert choose_quality(None, form) == (3, 3) and choose_quality("worst", form) == (1, 3)
    assert choose_quality("2/3", form) == (2, 3) and choose_quality(None, None) is None
    with pytest.raises(SystemExit, match="not tag-conditioned"):
        choose_quality("best", None)


# ------------------------------------------------------------------ the evidence of item 6
def sampled_replies(model, tokenizer, meta: str, prompts: list[str], samples: int = 4) -> list[tuple[str, str]]:
    """(prompt, reply) for `samples` sampled answers (temperature 1) to each prompt, generated the
    way moss-chat does (the two-pass protocol, no plugins)."""
    from moss_train.chat.protocol import Settings, TurnRequest, two_pass

    requests = [TurnRequest(meta, [], prompt) for prompt in prompts]
    out = []
    for seed in range(samples):
        settings = Settings(max_new_tokens=24, temperature=1.0, seed=seed)
        out += [(r.human, r.reply) for r in two_pass(model, tokenizer, requests, {}, settings)]
    return out


@pytest.fixture(scope="module")
def answer_figures(pretrain_data, reward_run):
    """figures(model_dir, meta) -> (share of sampled replies with "please", their mean reward
    under the reward model), over one prompt per word."""
    from moss_train.checkpoint.export import REWARD, load_model
    from moss_train.data import parsing, rendering
    from moss_train.tokenizer import load_tokenizer

    tokenizer, reward_model = load_tokenizer(pretrain_data / "tokenizer"), load_model(reward_run, REWARD)
    prompts = [f"Tell me about the {word}." for word in WORDS]

    def figures(model_dir, meta: str) -> tuple[float, float]:
        answers = sampled_replies(load_model(model_dir), tokenizer, meta, prompts)
        rewards = []
        for prompt, text in answers:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": text},
            ]
            ids, _ = rendering.render(tokenizer, parsing.parse_record({"messages": messages}))
            with torch.no_grad():
                rewards.append(float(reward_model(torch.from_numpy(ids)[None])[0]))
        return float(np.mean(["please" in text.split() for _, text in answers])), float(np.mean(rewards))

    return figures


def test_asked_for_the_best_tag_the_model_answers_as_the_reward_model_prefers(preference_run, answer_figures):
    from moss_train import format as fmt

    best = answer_figures(preference_run[0], fmt.with_quality(SYSTEM, 3, 3))
    worst = answer_figures(preference_run[0], fmt.with_quality(SYSTEM, 1, 3))
    assert best[0] > worst[0] + 0.2 and best[1] > worst[1] + 1.0, (best, worst)


@pytest.fixture(scope="module")
def dpo_run(pretrain_data, pair_data, preference_run, tmp_path_factory):
    """DPO on two processes from the tag-conditioned SFT run, with it as the frozen reference."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    run_cli(
        stage_overrides(
            pretrain_data,
            out,
            **{
                "stage": "dpo",
                "data": "pairs_demo",
                "data.root": str(pair_data),
                "stage.init_from": str(preference_run[0]),
                "trainer.max_steps": 40,
                "trainer.lr": 3e-4,
                "preference.beta": 0.5,
                "trainer.eval_samples": 16,
            },
        ),
        launcher=torchrun(),
        timeout=300,
    )
    return out


def greedy_figures(model_dir, tokenizer, reward_model, records) -> dict:
    """What moss-eval compare should report for one model at temperature 0, computed here one
    answer at a time: moss-chat's two-pass protocol, the judge, the reward of each dialogue alone."""
    from moss_train.checkpoint.export import load_model
    from moss_train.data import parsing, rendering
    from moss_train.eval import tool_use

    answers = tool_use.answer_first_turns(load_model(model_dir), tokenizer, records)
    scores = [tool_use.judge_answer(r, a) for r, a in zip(records, answers)]
    rewards = []
    for record, answer in zip(records, answers):
        ids, _ = rendering.render(tokenizer, parsing.parse_record(tool_use.answer_record(record, answer)))
        with torch.no_grad():
            rewards.append(float(reward_model(torch.from_numpy(ids)[None])[0]))
    return {
        "right": sum(s == tool_use.JUDGE_MAX for s in scores),
        "tool_called": sum(tool_use.called_a_tool(a) for a in answers),
        "judge_mean": float(np.mean(scores)),
        "reward_mean": float(np.mean(rewards)),
    }


def test_compare_reports_every_model_on_the_held_out_demo_prompts(
    pretrain_data, reward_run, preference_run, dpo_run, tmp_path, capsys
):
    """The quickstart's comparison command, on tool-use demo prompts: the tag-conditioned model
    asked for the best and the worst tag, the DPO model and its SFT start. Sampled answers (the
    same seeds for every model), judged and scored; greedy gives one answer per prompt, and its
    figures are those computed here from each model's own answers. (DPO started from the
    tag-conditioned run, so that run is the DPO's SFT start: --sft names it. A separate plain
    SFT run would add minutes of two-process training to the suite for no new code path.)"""
    from data_pipelines.demo_dialogues import write_demo_dialogues
    from moss_train.checkpoint.export import REWARD, load_model
    from moss_train.eval import cli as moss_eval
    from moss_train.eval.tool_use import JUDGE_MAX, checked
    from moss_train.tokenizer import load_tokenizer

    valid = write_demo_dialogues(tmp_path, n_train=20, n_valid=30, seed=5)["valid"]
    base = [
        "compare",
        "--tokenizer",
        str(pretrain_data / "tokenizer"),
        "--reward-model",
        str(reward_run),
        "--dialogues",
        str(valid),
        "--preference",
        str(preference_run[0]),
        "--dpo",
        str(dpo_run),
        "--sft",
        str(preference_run[0]),
        "--limit",
        "4",
    ]
    for extra, answers in ((["--samples", "2"], 8), (["--temperature", "0"], 4)):
        out = tmp_path / "comparison.json"
        assert moss_eval.main(base + extra + ["--out", str(out)]) == 0
        printed = capsys.readouterr().out
        figures = json.loads(out.read_text())
        assert sorted(figures) == ["best_tag", "dpo", "sampling", "sft", "worst_tag"]
        for name in ("best_tag", "worst_tag", "dpo", "sft"):
            row = figures[name]
            right, called = row["right"], row["tool_called"]
            assert (
                row["prompts"] == 4 and row["answers"] == right["n"] == answers and 0 <= row["judge_mean"] <= JUDGE_MAX
            )
            assert 0 <= right["rate"] <= called["rate"] <= 1  # a right answer called the tool
            assert f"{name:<10} right" in printed and math.isfinite(row["reward_mean"])
    assert figures["sampling"] == {"samples": 1, "temperature": 0.0, "top_p": 0.8, "seed": 0}

    tokenizer, reward_model = load_tokenizer(pretrain_data / "tokenizer"), load_model(reward_run, REWARD)
    records = checked(json.loads(line) for line in valid.read_text().splitlines())[:4]
    for name, model_dir in (("dpo", dpo_run), ("sft", preference_run[0])):
        expected, row = greedy_figures(model_dir, tokenizer, reward_model, records), figures[name]
        assert (row["right"]["hits"], row["tool_called"]["hits"]) == (expected["right"], expected["tool_called"]), name
        assert row["judge_mean"] == pytest.approx(expected["judge_mean"]), name
        assert row["reward_mean"] == pytest.approx(expected["reward_mean"], rel=1e-4, abs=1e-5), name


def test_dpo_with_a_frozen_reference_on_two_processes(dpo_run, preference_run, answer_figures):
    out = dpo_run
    records = train_losses(out)
    # Step 1: the policy IS the reference, so every pair's loss is -log sigmoid(0) = log 2 —
    # the reference log-probs gathered from both ranks match the policy's own, pair by pair.
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert records[1]["margin"] == pytest.approx(0, abs=1e-3)
    last = [records[step] for step in range(31, 41)]
    assert np.mean([r["loss"] for r in last]) < 0.5 and np.mean([r["accuracy"] for r in last]) > 0.75
    final = [r for r in read_metrics(out) if "eval_loss" in r][-1]
    assert math.isfinite(final["eval_loss"]) and 0 <= final["eval_accuracy"] <= 1

    # The evidence: asked the same prompts (no tag), the DPO model answers "please" more often
    # than its start, and its answers score higher under the reward model.
    start, tuned = answer_figures(preference_run[0], SYSTEM), answer_figures(out, SYSTEM)
    assert tuned[0] > start[0] + 0.2 and tuned[1] > start[1] + 0.5, (start, tuned)
