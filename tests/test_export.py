"""moss-export and stage.init_from for real: ZeRO-3 runs -> HF directories that transformers loads.

- the same training on 1 process and on 2 (ZeRO-3, gloo) exports the same HF weights;
- the export loads in transformers without custom code, its logits equal moss-train's, its
  greedy generation equals moss-train's, its tokenizer gives the same ids and its chat
  template renders the MOSS format exactly as the format module does;
- HF -> moss-train (a 2-rank ZeRO-3 checkpoint) -> HF is bit-identical;
- a MOSS-format directory imports (no custom code run) and its logits match; the vocabulary
  grows with mean rows; a reward model exports in its documented format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from moss_train import format as moss_format
from moss_train.checkpoint.chat_template import render_messages
from moss_train.checkpoint.cli import main as export_main
from moss_train.checkpoint.export import REWARD, export_checkpoint, load_model
from moss_train.checkpoint.sources import MossTrainCheckpoint
from moss_train.distributed import DistInfo
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.reward import RewardModel
from moss_train.tokenizer import MossTokenizer

from conftest import BIN, free_port, run_cli, train_overrides

RUN_SETTINGS = {"trainer.max_steps": 4, "deepspeed": "zero3"}
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def checkpoint_model(step_dir) -> CodeGenForCausalLM:
    """moss-train's own model with a checkpoint's consolidated fp32 weights."""
    source = MossTrainCheckpoint(step_dir)
    model = CodeGenForCausalLM(source.model_config)
    model.load_state_dict({name: source.tensor(name) for name in source.names})
    return model.eval()


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def max_abs_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


# ---------------------------------------------------------------------------- the runs
TRAINER_SCRIPT = r'''
import sys

import torch

from moss_train.config import compose, to_object, validate
from moss_train.engine.loop import Trainer
from moss_train.model.reward import RewardModel
from moss_train.stages import get_stage, lm
from moss_train.engine.stage import LossTerms
from moss_train.stages.pretrain import PretrainStage


class ToyRewardStage(PretrainStage):
    """Only here to produce a real reward-model checkpoint (the reward stage is a later issue):
    regress the reward at each sample's last token onto the parity of that token."""

    build_model = staticmethod(lambda cfg, tok: RewardModel(lm.resolve_model_config(cfg, tok)))

    def loss(self, ctx, model, batch):
        rewards = model(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids")).float()
        targets = batch["labels"].ne(-100).sum()  # what the engine counts for this batch
        error = ((rewards - (batch["input_ids"][:, -1] % 2).float()) ** 2).sum()
        return LossTerms(loss_sum=error * targets / rewards.numel(), num_targets=targets)


for job in sys.argv[1:]:
    mode, *overrides = job.split("\n")
    cfg = to_object(compose(overrides))
    validate(cfg)
    if mode == "train":
        Trainer(cfg, get_stage(cfg.stage.name)).fit()
    elif mode == "save-initial":  # the imported weights as a ZeRO-3 checkpoint, before any step
        trainer = Trainer(cfg, get_stage(cfg.stage.name))
        trainer.checkpoints.save(trainer.engine, 0, trainer._client_state())
    else:
        Trainer(cfg, ToyRewardStage()).fit()
'''


@torch.no_grad()
def random_hf_codegen(vocab_size: int, seed: int, **shape) -> transformers.CodeGenForCausalLM:
    """An HF CodeGen with every parameter random (biases and LayerNorms included)."""
    config = transformers.CodeGenConfig(
        vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **shape
    )
    model = transformers.CodeGenForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        base = 1.0 if "ln" in name and name.endswith("weight") else 0.0
        param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))
    return model


SMALL_SHAPE = dict(n_positions=128, n_ctx=128, n_embd=96, n_layer=3, n_head=4, rotary_dim=8)


@pytest.fixture(scope="module")
def zero3_runs(pretrain_data, tmp_path_factory) -> dict:
    """One launch per process count, to keep the suite fast:

    - 1 process (moss-train CLI): 4 training steps, exported to fp32 HF;
    - 2 ranks (one torchrun launch of TRAINER_SCRIPT, three jobs in turn): the same 4 training
      steps; an HF CodeGen directory imported (stage.init_from) and saved as a ZeRO-3
      checkpoint before any step; a reward model trained one step from the 1-process export
      (stage.init_from into a model with a new head). Each exported back to HF.
    """
    root = tmp_path_factory.mktemp("zero3")
    data = pretrain_data
    one, two, round_trip, reward = root / "one", root / "two", root / "round-trip", root / "reward"
    run_cli(train_overrides(data, one, **RUN_SETTINGS))
    export_checkpoint(one, root / "hf-one")

    source = root / "hf-source"
    random_hf_codegen(1024, seed=5, **SMALL_SHAPE).save_pretrained(source)
    MossTokenizer.load(data / "tokenizer").save_pretrained(source)
    jobs = [
        ["train", *train_overrides(data, two, **RUN_SETTINGS)],
        ["save-initial", *train_overrides(data, round_trip, **{"stage.init_from": source, "trainer.max_steps": 1})],
        ["reward", *train_overrides(data, reward, **{"stage.init_from": root / "hf-one", "trainer.max_steps": 1})],
    ]
    script = root / "trainer_jobs.py"
    script.write_text(TRAINER_SCRIPT)
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    result = run_cli(["\n".join(job) for job in jobs], launcher=torchrun)

    assert export_main([str(two), str(root / "hf-two")]) == 0  # the console entry point's code path
    # Trainer.fit() (which writes config.yaml, naming the tokenizer) did not run: say which.
    export_checkpoint(round_trip, root / "hf-back", tokenizer_dir=data / "tokenizer")
    export_checkpoint(reward, root / "hf-reward")
    return {
        "one": one,
        "two": two,
        "hf_one": root / "hf-one",
        "hf_two": root / "hf-two",
        "data": data,
        "source": source,
        "back": root / "hf-back",
        "reward": reward,
        "hf_reward": root / "hf-reward",
        "stdout": result.stdout,
    }


def test_one_and_two_process_zero3_runs_export_the_same_weights(zero3_runs):
    two_shards = sorted(p.name for p in (zero3_runs["two"] / "checkpoints" / "step_00000004").glob("*optim_states.pt"))
    assert len(two_shards) == 2  # really sharded over two ranks
    a, b = read_safetensors(zero3_runs["hf_one"]), read_safetensors(zero3_runs["hf_two"])
    initial = initial_weights(zero3_runs["one"])
    diff = max_abs_diff(a, b)
    mean_diff = max((a[n] - b[n]).abs().mean().item() for n in a)
    moved = max_abs_diff(a, initial)
    print(
        f"1-process vs 2-process ZeRO-3 export: max abs weight difference {diff:.3e} (mean {mean_diff:.1e}); "
        f"4 training steps moved weights by up to {moved:.3e}"
    )
    # Summation order differs between 1 and 2 ranks, and Adam turns a near-zero gradient into a
    # near-lr step of either sign, so a few elements may differ by a fraction of one step; a
    # wrong layout or a lost shard would differ by the weights themselves (~0.1).
    assert diff <= 0.01 * moved and mean_diff <= 1e-8
    assert moved > 1e-4  # trained weights, not two copies of the initial ones


def initial_weights(run: Path) -> dict:
    """The weights both runs started from: the trainer seeds trainer.seed right before building."""
    torch.manual_seed(1234)
    return dict(CodeGenForCausalLM(MossTrainCheckpoint(run).model_config).state_dict())


def test_export_loads_without_custom_code_and_logits_equal_the_training_model(zero3_runs):
    hf_dir = zero3_runs["hf_one"]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=False).eval()
    assert type(model).__name__ == "CodeGenForCausalLM" and model.dtype == torch.float32
    tokenizer = MossTokenizer.load(hf_dir)
    eoc, eom = tokenizer.token_to_id("<eoc>"), tokenizer.token_to_id("<eom>")
    # generate() stops where a tool must run (<eoc>) and after the reply (<eom>).
    assert model.generation_config.eos_token_id == [eoc, eom] and model.config.eos_token_id == eom
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == [eoc, eom]
    ours = checkpoint_model(zero3_runs["one"] / "checkpoints" / "step_00000004")
    text = "def add(a, b):\n    return a + b\n中文的句子。 The end."
    x = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        a, b = ours(x), model(x).logits
    diff = (a - b).abs().max().item()
    print(f"export vs training model: max abs logit difference {diff:.3e} over {x.shape[1]} tokens (fp32)")
    assert a.std() > 0.1 and diff <= 1e-5


@torch.no_grad()
def greedy(model: CodeGenForCausalLM, ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    """moss-train's model decoding greedily: the whole sequence each step, argmax of the last."""
    new: list[int] = []
    for _ in range(max_new_tokens):
        new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
        if new[-1] in stop_ids:
            break
    return new


def test_greedy_generate_of_the_export_equals_moss_train_greedy_decoding(zero3_runs):
    hf_dir = zero3_runs["hf_one"]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = checkpoint_model(zero3_runs["one"] / "checkpoints" / "step_00000004")
    stops = tuple(tokenizer.convert_tokens_to_ids(["<eoc>", "<eom>"]))
    for prompt in ("import os\nimport sys\n\ndef main", "人民日报"):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
        mine = greedy(ours, ids, max_new_tokens=20, stop_ids=stops)
        assert hf == mine, prompt
    assert len(set(hf)) > 1  # not a degenerate repeat of one token


def test_export_tokenizer_and_chat_template_give_what_training_saw(zero3_runs):
    hf_dir = zero3_runs["hf_one"]
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    ours = MossTokenizer.load(zero3_runs["data"] / "tokenizer")
    for text in ("Hello, world!\n\tindented", "今天天气很好。", "<|Human|>: hi<eoh>\n<|Inner Thoughts|>: None<eot>\n"):
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    human, thoughts, command = "What is 12*7? 请算一下", "I should calculate it.", 'Calculate("12*7")'
    result, reply = "Calculate(\"12*7\") => '84'", "It is 84."
    meta = moss_format.meta_instruction(["calculator"])
    messages = [
        {"role": "system", "content": meta},
        {"role": "user", "content": human},
        {"role": "assistant", "content": reply, "inner_thoughts": thoughts, "commands": command, "results": [result]},
        {"role": "user", "content": "And 1+1?"},
        {"role": "assistant", "content": "2."},
    ]
    dialogue = moss_format.Dialogue(
        meta,
        [
            moss_format.Turn.from_text(human, reply, inner_thoughts=thoughts, commands=command, results=[result]),
            moss_format.Turn.from_text("And 1+1?", "2."),
        ],
    )
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == moss_format.render(dialogue) == render_messages(messages)
    # Token ids: what SFT trains on is the per-segment encoding of the same dialogue.
    trained = [i for part in moss_format.encode_segments(ours, moss_format.dialogue_segments(dialogue)) for i in part]
    assert hf.apply_chat_template(messages, tokenize=True)["input_ids"] == trained
    # A conversation ending with a user message is the prompt the chat side builds, and the
    # generation prompt is the field the model writes next.
    segments = moss_format.prompt_segments(meta, dialogue.turns[:1], "And 1+1?")
    assert hf.apply_chat_template(messages[:-1], tokenize=False) == "".join(s.text for s in segments)
    prompt_text = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt_text == "".join(s.text for s in segments) + "<|Inner Thoughts|>:"


def test_sharded_and_low_precision_exports(zero3_runs, tmp_path):
    step = zero3_runs["one"] / "checkpoints" / "step_00000004"
    fp32 = read_safetensors(zero3_runs["hf_one"])
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / dtype
        result = export_checkpoint(step, out, dtype=dtype, max_shard_size="100KB")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(result.weight_files) > 2 and sorted(set(index["weight_map"].values())) == sorted(result.weight_files)
        tensors = read_safetensors(out)
        assert all(t.dtype == torch_dtype and torch.equal(t, fp32[n].to(torch_dtype)) for n, t in tensors.items())
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == torch_dtype
    with pytest.raises(FileExistsError):
        export_checkpoint(step, tmp_path / "bf16")


# ---------------------------------------------------------------------------- imports
def test_hf_to_moss_train_to_hf_round_trip_is_bit_identical(zero3_runs):
    before, after = read_safetensors(zero3_runs["source"]), read_safetensors(zero3_runs["back"])
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[n], after[n]) for n in before)
    config_before = json.loads((zero3_runs["source"] / "config.json").read_text())
    config_after = json.loads((zero3_runs["back"] / "config.json").read_text())
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "activation_function"):
        assert config_before[key] == config_after[key], key
    # The recipe said model=tiny (n_embd 128, ...): the checkpoint's shapes replaced it, loudly.
    assert (
        "model shapes from the checkpoint: model.n_positions 512 -> 128; model.n_embd 64 -> 96; model.n_layer 2 -> 3"
        in zero3_runs["stdout"]
    )


def test_reward_model_exports_in_its_documented_format(zero3_runs):
    hf_dir = zero3_runs["hf_reward"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["CodeGenModel"] and config["moss_reward"]["head"] == "score"
    assert not (hf_dir / "generation_config.json").exists()
    assert (
        "2 tensors of" in zero3_runs["stdout"] and "lm_head.weight" in zero3_runs["stdout"]
    )  # unused by a reward model
    assert "start freshly initialised" in zero3_runs["stdout"] and "score.weight" in zero3_runs["stdout"]
    tokenizer = MossTokenizer.load(hf_dir)
    x = torch.tensor(
        [tokenizer.encode("def f():\n    return 1\n")[:9], tokenizer.encode("今天天气很好。The end.  ")[:9]]
    )
    reward_model = load_model(hf_dir, REWARD)
    # The training model: the checkpoint's consolidated weights in a RewardModel.
    source = MossTrainCheckpoint(zero3_runs["reward"])
    trained = RewardModel(source.model_config).eval()
    trained.load_state_dict({n: source.tensor(n) for n in source.names})
    # Plain transformers: the backbone, then the documented score head by hand.
    backbone = transformers.AutoModel.from_pretrained(hf_dir).eval()
    with safe_open(str(next(hf_dir.glob("*.safetensors"))), framework="pt") as handle:
        weight, bias = handle.get_tensor("score.weight"), handle.get_tensor("score.bias")
    with torch.no_grad():
        ours, theirs = reward_model(x), trained(x)
        plain = backbone(x).last_hidden_state[:, -1] @ weight.T + bias
        at = reward_model(x, read_positions=torch.tensor([[3, 8], [0, 8]]))
    assert ours.shape == (2,) and torch.equal(ours, theirs)
    assert (ours - plain[:, 0]).abs().max() <= 1e-5
    assert at.shape == (2, 2) and torch.allclose(at[:, 1], ours)
    assert ours[0] != ours[1]


# ---------------------------------------------------------------------------- MOSS format
MOSS_TOKENIZER_CODE = """
from pathlib import Path
from transformers import PreTrainedTokenizerFast

Path({marker!r}).write_text("custom tokenizer code ran")


class MossTokenizer(PreTrainedTokenizerFast):
    pass
"""


def write_moss_dir(path: Path, hf_model, tokenizer: MossTokenizer, marker: Path) -> None:
    """A directory laid out like fnlp/moss-moon-003-*: model_type moss, custom-code auto_map,
    fp16 weights in sharded pytorch_model-*.bin with an index and the legacy attention buffers,
    and a tokenizer that needs its own code."""
    path.mkdir(parents=True)
    c = hf_model.config
    config = {
        "_name_or_path": "fnlp/moss-moon-003-sft",
        "architectures": ["MossForCausalLM"],
        "model_type": "moss",
        "auto_map": {
            "AutoConfig": "configuration_moss.MossConfig",
            "AutoModel": "modeling_moss.MossModel",
            "AutoModelForCausalLM": "modeling_moss.MossForCausalLM",
        },
        "activation_function": "gelu_new",
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 13,
        "gradient_checkpointing": False,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "n_ctx": c.n_positions,
        "n_positions": c.n_positions,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_inner": None,
        "n_layer": c.n_layer,
        "rotary_dim": c.rotary_dim,
        "scale_attn_weights": True,
        "tie_word_embeddings": False,
        "tokenizer_class": "MossTokenizer",
        "torch_dtype": "float16",
        "transformers_version": "4.25.1",
        "use_cache": True,
        "vocab_size": c.vocab_size,
        "wbits": 32,
        "groupsize": 128,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("configuration_moss.py", "modeling_moss.py"):
        (path / name).write_text(f"open({str(marker)!r}, 'w').write('{name} ran')\n")
    state = {n: t.half() for n, t in hf_model.state_dict().items()}
    for i in range(c.n_layer):  # buffers older transformers saved with every layer
        state[f"transformer.h.{i}.attn.causal_mask"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    names = list(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, part in shards.items():
        torch.save({n: state[n] for n in part}, path / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer.save_pretrained(path)  # tokenizer.json; then make it need custom code, as MOSS's does
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.update(
        tokenizer_class="MossTokenizer", auto_map={"AutoTokenizer": ["tokenization_moss.MossTokenizer", None]}
    )
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (path / "tokenization_moss.py").write_text(MOSS_TOKENIZER_CODE.format(marker=str(marker)))


def import_into_model(directory: Path, data_dir: Path, trust_remote_code: bool = False) -> CodeGenForCausalLM:
    """stage.init_from as the trainer does it (adopt the config, build, load), in one process."""
    from moss_train.checkpoint.init import adopt_model_config, load_initial_weights
    from moss_train.config import MossTrainConfig, recipe_tokenizer
    from moss_train.stages import lm

    cfg = MossTrainConfig()
    cfg.stage.init_from, cfg.stage.trust_remote_code = str(directory), trust_remote_code
    cfg.data.tokenizer, cfg.data.seq_len = str(data_dir / "tokenizer"), 64
    tokenizer = recipe_tokenizer(cfg)
    cfg = adopt_model_config(cfg, tokenizer, SINGLE)
    model = lm.build_causal_lm(cfg, tokenizer)
    load_initial_weights(model, cfg, tokenizer, SINGLE)
    return model.eval()


@pytest.fixture()
def moss_dir(pretrain_data, tmp_path):
    marker = tmp_path / "custom-code-ran"
    hf_model = random_hf_codegen(960, seed=11, **SMALL_SHAPE)  # 960 rows < the tokenizer's 1000 ids
    directory = tmp_path / "moss-moon-003-sft"
    write_moss_dir(directory, hf_model, MossTokenizer.load(pretrain_data / "tokenizer"), marker)
    return directory, hf_model, marker


def test_moss_format_directory_imports_without_running_its_code_and_matches(moss_dir, pretrain_data, capsys):
    directory, hf_model, marker = moss_dir
    ours = import_into_model(directory, pretrain_data)
    output = capsys.readouterr().out
    assert not marker.exists(), "no code shipped with the checkpoint may run without trust_remote_code"
    assert "needs custom code; set stage.trust_remote_code=true" in output
    # The vocabulary grew from 960 rows to the tokenizer's 1000 (padded to 1024): new rows are
    # the mean of the checkpoint's rows; the old rows are the checkpoint's fp16 values.
    source = {n: t.float() for n, t in hf_model.state_dict().items()}
    for name in ("transformer.wte.weight", "lm_head.weight", "lm_head.bias"):
        grown = dict(ours.named_parameters())[name].detach()
        reference = source[name].half().float()
        assert grown.shape[0] == 1024 and torch.equal(grown[:960], reference), name
        # The mean of 960 rows of N(0, 0.1) is ~3e-3 per element: compared relatively (and at an
        # absolute floor 1e-8), a wrong row set or a zero row fails; fp32 means of the same values agree.
        mean_row = reference.mean(0).expand_as(grown[960:])
        assert mean_row.abs().max() > 1e-3, name
        torch.testing.assert_close(grown[960:], mean_row, rtol=1e-6, atol=1e-8, msg=name)
    # Logits on the checkpoint's own vocabulary equal transformers' CodeGen with the same weights.
    reference_model = transformers.CodeGenForCausalLM(hf_model.config).eval()
    reference_model.load_state_dict({n: t.half().float() for n, t in source.items()})
    x = torch.randint(0, 960, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x)[..., :960], reference_model(x).logits
    diff = (a - b).abs().max().item()
    print(f"MOSS-format import vs transformers CodeGen: max abs logit difference {diff:.3e}")
    assert a.std() > 0.3 and diff <= 1e-5


def test_trust_remote_code_runs_the_checkpoints_tokenizer_code(moss_dir, pretrain_data, capsys):
    directory, _, marker = moss_dir
    import_into_model(directory, pretrain_data, trust_remote_code=True)
    assert marker.read_text() == "custom tokenizer code ran"  # only the tokenizer's code
    output = capsys.readouterr().out
    assert "needs custom code" not in output and "differ" not in output  # same vocabulary as the run's


def test_added_tokens_get_mean_rows_even_inside_the_padding(pretrain_data):
    from moss_train.checkpoint.init import fresh_vocab_rows

    tokenizer = MossTokenizer.load(pretrain_data / "tokenizer")
    pieces = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    # The checkpoint's tokenizer lacked the last 10 tokens; its 1024 rows already cover them.
    assert fresh_vocab_rows(tokenizer, pieces[:-10], source_rows=1024, model_rows=1024) == list(range(990, 1000))
    assert fresh_vocab_rows(tokenizer, pieces, source_rows=1024, model_rows=1024) == []
    assert fresh_vocab_rows(tokenizer, None, source_rows=960, model_rows=1024) == list(range(960, 1024))


def test_init_from_errors_name_the_key(moss_dir, pretrain_data, tmp_path):
    from moss_train.checkpoint.init import adopt_model_config
    from moss_train.config import MossTrainConfig, validate
    from moss_train.errors import ConfigError

    cfg = MossTrainConfig()
    cfg.data.train_shards, cfg.data.tokenizer = ["x"], str(pretrain_data / "tokenizer")
    cfg.stage.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="stage.init_from"):
        validate(cfg, world_size=1)
    cfg.stage.init_from, cfg.stage.trust_remote_code = None, True
    with pytest.raises(ConfigError, match="stage.trust_remote_code"):
        validate(cfg, world_size=1)
    cfg.stage.init_from, cfg.data.seq_len = str(moss_dir[0]), 256  # the checkpoint has n_positions 128
    with pytest.raises(ConfigError, match="data.seq_len"):
        adopt_model_config(cfg, MossTokenizer.load(pretrain_data / "tokenizer"), SINGLE)
