"""`moss-export`: a moss-train checkpoint (ZeRO-sharded over any number of ranks) -> an HF directory.

What OUT_DIR holds (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(OUT_DIR)``
load it with ``trust_remote_code`` off):

    config.json                         CodeGenForCausalLM (vocab_size = the padded rows;
                                        bos, eos = <eom>, pad from the tokenizer; dtype)
    generation_config.json              eos_token_id = <eom>: generation ends with the reply
    model.safetensors                   or model-0000i-of-0000n.safetensors +
                                        model.safetensors.index.json (--max-shard-size)
    tokenizer.json, tokenizer_config.json (with the MOSS chat_template), special_tokens_map.json,
    tokenizer.model, tokenizer_meta.json   the run's tokenizer, for transformers and moss-train
    moss_export.json                    provenance: source checkpoint, step, stage, dtype, and
                                        the moss-train model config

Weights are DeepSpeed's fp32 master weights, consolidated from every rank's shard by
``deepspeed.utils.zero_to_fp32`` one tensor at a time (lazy mode), then cast to the chosen
dtype; the checkpoint's checksums are verified first. The directory is written beside OUT_DIR
and renamed into place when complete.

Reward-model format (a checkpoint whose model is :class:`moss_train.model.reward.RewardModel`):
``config.json`` is ``CodeGenModel``'s (``architectures: ["CodeGenModel"]``) plus

    "moss_reward": {"format_version": 1, "head": "score", "read_at": "last_token"}

and the safetensors hold ``transformer.*`` and ``score.weight`` (1 x n_embd), ``score.bias``
(1). ``load_reward_model(dir)`` loads all of it; with transformers alone,
``AutoModel.from_pretrained(dir)`` gives the backbone and the reward of a sequence is
``last_hidden_state[:, -1] @ score.weight.T + score.bias`` (the tensors read with
``safetensors.safe_open``). No generation config is written for a reward model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from moss_train import format as fmt
from moss_train.checkpoint.sources import MossTrainCheckpoint, _load_tokenizer, log, open_source
from moss_train.checkpoint.store import CheckpointError, ensure_free_space
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import ModelConfig, model_vocab_size, to_hf_config
from moss_train.model.reward import SCORE_PREFIX, RewardModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CAUSAL_LM, REWARD = "causal_lm", "reward"
REWARD_FORMAT = {"format_version": 1, "head": "score", "read_at": "last_token"}
END_OF_REPLY = "<eom>"
EXPORT_MANIFEST = "moss_export.json"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass
class ExportResult:
    out_dir: Path
    kind: str
    step: int
    num_parameters: int
    weight_files: list[str]
    tokenizer: str  # what was written for the tokenizer


def model_kind(names) -> str:
    names = set(names)
    if f"{SCORE_PREFIX}weight" in names and "lm_head.weight" not in names:
        return REWARD
    return CAUSAL_LM


def expected_shapes(cfg: ModelConfig, kind: str) -> dict[str, tuple]:
    """Parameter names and shapes of the model, in its own order, without allocating it."""
    with torch.device("meta"):
        model = RewardModel(cfg) if kind == REWARD else CodeGenForCausalLM(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_names_and_shapes(source, expected: dict[str, tuple]) -> None:
    have = set(source.names)
    missing = [n for n in expected if n not in have]
    extra = sorted(have - set(expected))
    wrong = [f"{n} {source.shape(n)} vs {expected[n]}" for n in expected if n in have and tuple(source.shape(n)) != expected[n]]
    if missing or extra or wrong:
        raise CheckpointError(
            f"{source.path} does not hold the model its config describes: missing {missing[:6]}, "
            f"unexpected {extra[:6]}, shapes {wrong[:6]}"
        )


# ----------------------------------------------------------------------------- writing


def write_safetensors(
    directory: Path,
    shapes: dict[str, tuple],
    fetch: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    max_shard_size: int | str,
) -> list[str]:
    """Tensors in `shapes` order, fetched one shard at a time, as (sharded) safetensors + index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    placeholders = {n: torch.empty(s, dtype=dtype, device="meta") for n, s in shapes.items()}
    split = split_torch_state_dict_into_shards(placeholders, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        tensors = {n: fetch(n).to(dtype).contiguous() for n in names}
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        (directory / filename).chmod(0o644)  # safetensors creates it owner-only; a model is for sharing
        del tensors
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def hf_config(cfg: ModelConfig, kind: str, tokenizer, dtype: torch.dtype):
    """config.json: CodeGen's, with the tokenizer's ids and MOSS's convention eos = <eom>."""
    config = to_hf_config(cfg)
    config.architectures = ["CodeGenModel" if kind == REWARD else "CodeGenForCausalLM"]
    config.bos_token_id = tokenizer.bos_id
    config.eos_token_id = tokenizer.token_to_id(END_OF_REPLY)
    config.pad_token_id = tokenizer.pad_id
    config.dtype = dtype
    if kind == REWARD:
        config.moss_reward = dict(REWARD_FORMAT)
    return config


def write_generation_config(directory: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.token_to_id(END_OF_REPLY),
        pad_token_id=tokenizer.pad_id,
    ).save_pretrained(str(directory))


def write_tokenizer(directory: Path, tokenizer) -> str:
    """The tokenizer files with the MOSS chat template; one call into the tokenizer module."""
    from moss_train.checkpoint.chat_template import build_chat_template

    tokenizer.save_pretrained(directory, extra_config={"chat_template": build_chat_template()})
    return f"{type(tokenizer).__name__}.save_pretrained (tokenizer.json + chat_template)"


# ----------------------------------------------------------------------------- the export


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_size: int | str = "5GB",
    tokenizer_dir: Optional[str | Path] = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the HF directory of a moss-train checkpoint (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (--overwrite replaces it)")
    source = MossTrainCheckpoint(checkpoint)
    log(f"verifying checksums of {source.step_dir}")
    source.verify()
    cfg = source.model_config
    kind = model_kind(source.names)
    shapes = expected_shapes(cfg, kind)
    check_names_and_shapes(source, shapes)
    tokenizer = _export_tokenizer(source, tokenizer_dir, cfg)

    num = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(out_dir.parent, num * DTYPES[dtype].itemsize, f"the export of {source.step_dir}")

    staging = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files = write_safetensors(staging, shapes, source.tensor, DTYPES[dtype], max_shard_size)
    hf_config(cfg, kind, tokenizer, DTYPES[dtype]).save_pretrained(str(staging))
    if kind == CAUSAL_LM:
        write_generation_config(staging, tokenizer)
    tokenizer_state = write_tokenizer(staging, tokenizer)
    write_manifest(staging, source, kind, dtype, files, tokenizer)
    _copy_quality_form(source.step_dir, staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    step = source.complete.get("step")
    log(f"exported {kind} ({num:,} parameters, {dtype}, {len(files)} weight file(s)) from step {step} to {out_dir}")
    return ExportResult(out_dir, kind, step, num, files, tokenizer_state)


def write_manifest(directory: Path, source: MossTrainCheckpoint, kind: str, dtype: str, files: list[str], tokenizer) -> None:
    """moss_export.json: where the weights came from, for whoever finds the directory later."""
    manifest = {
        "source": str(source.step_dir.resolve()),
        "step": source.complete.get("step"),
        "stage": source.meta.get("stage"),
        "kind": kind,
        "dtype": dtype,
        "weight_files": files,
        "tokenizer_hash": tokenizer.hash,
        "moss_train_model_config": asdict(source.model_config),
    }
    (directory / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _copy_quality_form(step_dir: Path, directory: Path) -> None:
    """A tag-conditioned model's tag form (stage=preference's quality.json) travels with it, so
    moss-chat asks the export for a tag the way training saw it."""
    form = fmt.find_quality_form(step_dir)
    if form is not None:
        (directory / fmt.QUALITY_FILE).write_text(json.dumps(form, indent=1) + "\n")


def _export_tokenizer(source: MossTrainCheckpoint, tokenizer_dir, cfg: ModelConfig):
    directory = Path(tokenizer_dir) if tokenizer_dir else source.recipe_tokenizer()
    if directory is None:
        raise CheckpointError(
            f"cannot find the tokenizer of {source.step_dir} (the run's config.yaml names none that exists "
            "here); pass --tokenizer DIR"
        )
    tokenizer = _load_tokenizer(directory)
    if tokenizer.vocab_size > model_vocab_size(cfg):
        raise CheckpointError(f"tokenizer {directory} has {tokenizer.vocab_size} ids, the model {model_vocab_size(cfg)} rows")
    return tokenizer


def load_reward_model(path: str | Path) -> RewardModel:
    """A reward model (fp32 parameters, eval mode) from a moss-train checkpoint (a stage=reward
    run, checkpoints or step directory; its checksums verified) or a moss-export directory."""
    source = open_source(path)
    if model_kind(source.names) != REWARD:
        raise CheckpointError(f"{path} is not a reward model (no {SCORE_PREFIX}weight, or it has an lm_head)")
    source.verify()
    cfg = source.model_config
    check_names_and_shapes(source, expected_shapes(cfg, REWARD))
    model = RewardModel(cfg)
    model.load_state_dict({n: source.tensor(n).float() for n in source.names})
    return model.eval()
