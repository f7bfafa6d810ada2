"""`moss-export`: a moss-train checkpoint (ZeRO-sharded over any number of ranks) -> an HF directory.

What OUT_DIR holds (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(OUT_DIR)``
load it with ``trust_remote_code`` off):

    config.json                         CodeGenForCausalLM (vocab_size = the padded rows;
                                        bos, eos = <eom>, pad from the tokenizer; dtype)
    generation_config.json              eos_token_id = [<eoc>, <eom>]: generation stops where a
                                        tool must run (pass one) and after the reply
    model.safetensors                   or model-0000i-of-0000n.safetensors +
                                        model.safetensors.index.json (--max-shard-size)
    tokenizer.json, tokenizer_config.json (with the MOSS chat_template), special_tokens_map.json,
    tokenizer.model, tokenizer_meta.json   the run's tokenizer, for transformers and moss-train
                                        (the chat template's default meta instruction is the
                                        one the run trained with: see chat_format below)
    moss_export.json                    provenance: source checkpoint, step, stage, dtype, and
                                        the moss-train model config

Weights are DeepSpeed's fp32 master weights, consolidated from every rank's shard by
``deepspeed.utils.zero_to_fp32`` one tensor at a time (lazy mode), then cast to the chosen
dtype; the checkpoint's checksums are verified first. The directory is written beside OUT_DIR
and renamed into place when complete.

A LoRA checkpoint (``lora.r`` > 0: the adapters, and a reward head, only) exports two ways:

- merged (default): the weights above, each adapted projection ``W + (alpha / r) * B @ A`` over
  the base the run started from (stage.init_from, which must still hold those weights: its
  fingerprint is checked) — a plain HF model;
- ``--lora adapter``: peft's adapter directory, ``adapter_config.json`` +
  ``adapter_model.safetensors`` (+ the tokenizer and generation config), that
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT_DIR)`` loads; BASE is
  stage.init_from when that is an HF directory, else an export of it (``--base``).

Reward-model format (a checkpoint whose model is :class:`moss_train.model.reward.RewardModel`):
``config.json`` is ``CodeGenModel``'s (``architectures: ["CodeGenModel"]``) plus

    "moss_reward": {"format_version": 1, "head": "score", "read_at": "last_token"}

and the safetensors hold ``transformer.*`` and ``score.weight`` (1 x n_embd), ``score.bias``
(1). ``load_model(dir, REWARD)`` loads all of it; with transformers alone,
``AutoModel.from_pretrained(dir)`` gives the backbone and the reward of a sequence is
``last_hidden_state[:, -1] @ score.weight.T + score.bias`` (the tensors read with
``safetensors.safe_open``). No generation config is written for a reward model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch

from moss_train import format as fmt
from moss_train.checkpoint.chat_template import ChatFormat, build_chat_template
from moss_train.checkpoint.sources import (
    MossTrainCheckpoint,
    _load_tokenizer,
    log,
    open_source,
    recipe_path,
    weights_fingerprint,
)
from moss_train.checkpoint.store import CheckpointError, ensure_free_space
from moss_train.data.rendering import TURN_START
from moss_train.data.shards import ShardError, TokenShard
from moss_train.data.token_datasets import resolve_shard_prefixes
from moss_train.errors import ConfigError
from moss_train.model import lora
from moss_train.model.codegen import CodeGenForCausalLM, column_major_head
from moss_train.model.config import ModelConfig, model_vocab_size, to_hf_config
from moss_train.model.reward import SCORE_PREFIX, RewardModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CAUSAL_LM, REWARD, LORA_ADAPTER = "causal_lm", "reward", "lora_adapter"
KIND_NAMES = {
    CAUSAL_LM: "causal language model (an lm_head)",
    REWARD: f"reward model ({SCORE_PREFIX}weight, no lm_head)",
}
LORA_FORMATS = ("merged", "adapter")  # a LoRA checkpoint exports as full weights or as a peft adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REWARD_FORMAT = {"format_version": 1, "head": "score", "read_at": "last_token"}
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
    wrong = [
        f"{n} {source.shape(n)} vs {expected[n]}"
        for n in expected
        if n in have and tuple(source.shape(n)) != expected[n]
    ]
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
    split = split_torch_state_dict_into_shards(
        placeholders, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size
    )
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
    config.eos_token_id = tokenizer.token_to_id(fmt.END_OF_REPLY)
    config.pad_token_id = tokenizer.pad_id
    config.dtype = dtype
    if kind == REWARD:
        config.moss_reward = dict(REWARD_FORMAT)
    return config


def write_generation_config(directory: Path, tokenizer) -> None:
    """generate() stops at <eoc> (the commands are written: the tools run) and at <eom>."""
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=[tokenizer.token_to_id(fmt.END_OF_COMMANDS), tokenizer.token_to_id(fmt.END_OF_REPLY)],
        pad_token_id=tokenizer.pad_id,
    ).save_pretrained(str(directory))


def write_tokenizer(directory: Path, tokenizer, chat: ChatFormat | None = None) -> str:
    """The tokenizer files with the MOSS chat template; one call into the tokenizer module."""
    tokenizer.save_pretrained(directory, extra_config={"chat_template": build_chat_template(chat or ChatFormat())})
    return f"{type(tokenizer).__name__}.save_pretrained (tokenizer.json + chat_template)"


def training_meta_instruction(source: MossTrainCheckpoint, tokenizer) -> Optional[str]:
    """The meta instruction of the run's first training dialogue: the tokens before the first
    turn of the first document of its first data shard (SFT, tag-conditioned and pair shards
    all carry turn starts). None when the run trained on no dialogues, or its data is gone."""
    recipe = source.recipe()
    root = recipe_path(recipe.data.root) if recipe is not None and recipe.data.train_shards else None
    if root is None:
        return None
    try:
        shard = TokenShard(resolve_shard_prefixes(str(root), list(recipe.data.train_shards), "data.train_shards")[0])
    except (ConfigError, ShardError, OSError):
        return None
    if not shard.has_mask or len(shard) == 0 or shard.tokenizer_hash != tokenizer.hash:
        return None
    starts = np.flatnonzero(shard.document_mask(0) & TURN_START)
    return tokenizer.decode(shard.document(0)[: starts[0]].tolist()) if len(starts) else None


def chat_format(source: MossTrainCheckpoint, tokenizer, preamble: Optional[str] = None) -> ChatFormat:
    """How the model was prompted in training, for the chat template: the training data's meta
    instruction (its preamble, capability lines or not), the best tag of a tag-conditioned
    model; `preamble` overrides the data's; without either, MOSS's preamble."""
    quality = fmt.find_quality_form(source.step_dir)
    meta = training_meta_instruction(source, tokenizer) if preamble is None else None
    if preamble is not None:
        chat, origin = ChatFormat(preamble, quality=quality), "the preamble given"
    elif meta is not None:
        chat, origin = ChatFormat.from_meta_instruction(meta, quality), "the run's training data"
    else:
        chat, origin = ChatFormat(quality=quality), "MOSS's (the run's data has no dialogues, or is not here)"
    first_line = chat.preamble.split("\n", 1)[0]
    tag = f", asking for quality {quality['levels']}/{quality['levels']}" if quality else ""
    log(f"chat template: default meta instruction from {origin}: {first_line[:60]!r}...{tag}")
    return chat


# ----------------------------------------------------------------------------- the export


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_size: int | str = "5GB",
    tokenizer_dir: Optional[str | Path] = None,
    overwrite: bool = False,
    preamble: Optional[str] = None,
    lora_format: str = "merged",
    base_dir: Optional[str | Path] = None,
    quantize: Optional[str] = None,
) -> ExportResult:
    """Write the HF directory of a moss-train checkpoint (see the module docstring). A LoRA
    checkpoint (adapters only) exports merged into its base (`lora_format` "merged": plain HF
    weights) or as a peft adapter directory ("adapter"; `base_dir`: an HF directory of the base
    when stage.init_from was a moss-train checkpoint). `quantize` ("int8", "int4"): a weight-only
    quantized export of a causal LM (moss_train/checkpoint/quantize.py)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if lora_format not in LORA_FORMATS:
        raise ValueError(f"lora_format {lora_format!r} is not one of {', '.join(LORA_FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (--overwrite replaces it)")
    source = MossTrainCheckpoint(checkpoint)
    log(f"verifying checksums of {source.step_dir}")
    source.verify()
    cfg = source.model_config
    settings = source.meta.get("lora")
    if lora_format == "adapter" and not settings:
        raise CheckpointError(
            f"{source.step_dir} holds full weights, not LoRA adapters: export it without --lora adapter"
        )
    weights = LoraMerged(source, settings) if settings else source
    kind = model_kind(weights.names)
    if lora_format == "adapter" and kind == REWARD:
        raise CheckpointError(
            "a LoRA reward model exports merged (its score head is not a peft adapter of a causal LM)"
        )
    if quantize and (kind == REWARD or lora_format == "adapter"):
        raise CheckpointError(
            "quantized exports are for causal LMs with their weights (not reward models or adapter directories)"
        )
    shapes = expected_shapes(cfg, kind)
    check_names_and_shapes(weights, shapes)
    tokenizer = _export_tokenizer(source, tokenizer_dir, cfg)
    if lora_format == "adapter":
        shapes = {name: source.shape(name) for name in source.names}
        kind = LORA_ADAPTER

    num = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(out_dir.parent, num * DTYPES[dtype].itemsize, f"the export of {source.step_dir}")

    staging = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if kind == LORA_ADAPTER:
        files = write_adapter(staging, source, settings, DTYPES[dtype], base_dir)
    else:
        files = write_safetensors(staging, shapes, weights.tensor, DTYPES[dtype], max_shard_size)
        hf_config(cfg, kind, tokenizer, DTYPES[dtype]).save_pretrained(str(staging))
    if kind != REWARD:
        write_generation_config(staging, tokenizer)
    if quantize:
        from moss_train.checkpoint.quantize import quantize_export

        files = quantize_export(staging, quantize, max_shard_size)
        dtype = f"{quantize} ({dtype} compute)"
    tokenizer_state = write_tokenizer(staging, tokenizer, chat_format(source, tokenizer, preamble))
    write_manifest(staging, source, kind, dtype, files, tokenizer)
    _copy_quality_form(source.step_dir, staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    step = source.complete.get("step")
    log(f"exported {kind} ({num:,} parameters, {dtype}, {len(files)} weight file(s)) from step {step} to {out_dir}")
    return ExportResult(out_dir, kind, step, num, files, tokenizer_state)


# ----------------------------------------------------------------------------- LoRA


def lora_base(settings: dict):
    """The weight source the adapters were trained on (stage.init_from, as the run resolved it),
    checked to hold the same weights still."""
    path = Path(settings["base"]["path"])
    if not path.exists():
        raise CheckpointError(f"the base these LoRA adapters were trained on, {path}, is not there any more")
    base = open_source(path)
    if weights_fingerprint(base) != settings["base"]["fingerprint"]:
        raise CheckpointError(
            f"{path} has changed since the LoRA adapters were trained on it: "
            "they fit only the weights they were trained with"
        )
    return base


class LoraMerged:
    """A LoRA checkpoint's weights merged into its base, as a weight source: the base's tensors,
    ``W + (alpha / r) * B @ A`` where adapted, and what trained besides (a reward head, which
    then replaces the base's vocabulary head)."""

    def __init__(self, adapters: MossTrainCheckpoint, settings: dict):
        self.path, self.adapters, self.scaling = adapters.path, adapters, lora.scaling(SimpleNamespace(**settings))
        self.base = lora_base(settings)
        self.pairs = lora.adapted_weights(adapters.names)
        self.own = [n for n in adapters.names if not lora.is_adapter(n)]
        dropped = ("lm_head.",) if self.own else ()
        self.names = [n for n in self.base.names if not n.startswith(dropped)] + self.own

    def shape(self, name: str) -> tuple:
        return (self.adapters if name in self.own else self.base).shape(name)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.own:
            return self.adapters.tensor(name)
        if name in self.pairs:
            a, b = self.pairs[name]
            return lora.merged(self.base.tensor(name), self.adapters.tensor(a), self.adapters.tensor(b), self.scaling)
        return self.base.tensor(name)


def write_adapter(
    directory: Path, source: MossTrainCheckpoint, settings: dict, dtype: torch.dtype, base_dir
) -> list[str]:
    """peft's adapter directory: adapter_config.json + adapter_model.safetensors, for
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)``."""
    from safetensors.torch import save_file

    base = hf_base(settings, base_dir)
    tensors = {lora.peft_key(name): source.tensor(name).to(dtype).contiguous() for name in source.names}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_WEIGHTS).chmod(0o644)
    lora.peft_config(SimpleNamespace(**settings), base_model_name_or_path=str(base)).save_pretrained(str(directory))
    return [ADAPTER_WEIGHTS]


def hf_base(settings: dict, base_dir) -> Path:
    """An HF directory with the adapters' base weights: the base itself, or `base_dir` when the
    base is a moss-train checkpoint (an export of it, by its moss_export.json)."""
    base = Path(settings["base"]["path"])
    if (base / "config.json").is_file() and base_dir is None:
        return base
    if base_dir is None:
        raise CheckpointError(
            f"the adapters' base {base} is a moss-train checkpoint: "
            f"export it (moss-export {base} BASE_DIR) and pass --base BASE_DIR"
        )
    base_dir = Path(base_dir)
    manifest = json.loads((base_dir / EXPORT_MANIFEST).read_text()) if (base_dir / EXPORT_MANIFEST).is_file() else {}
    same = manifest.get("source") == str(base) or ((base / "config.json").is_file() and base_dir.resolve() == base)
    if not same:
        raise CheckpointError(
            f"{base_dir} is not an export of the adapters' base {base} "
            f"(its moss_export.json names {manifest.get('source')})"
        )
    return base_dir


def write_manifest(
    directory: Path, source: MossTrainCheckpoint, kind: str, dtype: str, files: list[str], tokenizer
) -> None:
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
        **({"lora": source.meta["lora"]} if source.meta.get("lora") else {}),
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
        raise CheckpointError(
            f"tokenizer {directory} has {tokenizer.vocab_size} ids, the model {model_vocab_size(cfg)} rows"
        )
    return tokenizer


def load_model(path: str | Path, kind: str = CAUSAL_LM) -> CodeGenForCausalLM | RewardModel:
    """A model for inference (fp32 parameters, eval mode): a causal LM (moss-chat, moss-serve,
    moss-eval, sampling pairs) or, with kind=REWARD, a reward model. From a moss-train checkpoint
    (a step, checkpoints or run directory; ZeRO shards consolidated, checksums verified first), a
    moss-export directory or an HF CodeGen / MOSS directory, through the weight sources of
    ``stage.init_from`` (checkpoint/sources.py)."""
    source = open_source(path)
    found = model_kind(source.names)
    if found != kind:
        raise CheckpointError(f"{path} holds a {KIND_NAMES[found]}, not a {KIND_NAMES[kind]}")
    source.verify()
    cfg = source.model_config
    check_names_and_shapes(source, expected_shapes(cfg, kind))
    model = RewardModel(cfg) if kind == REWARD else CodeGenForCausalLM(cfg)
    model.load_state_dict({n: source.tensor(n).float() for n in source.names})
    return (model if kind == REWARD else column_major_head(model)).eval()
