"""The typed recipe: one dataclass per recipe group, composed by Hydra, validated up front.

Hydra merges the YAML recipes under ``recipes/`` onto these dataclasses, so an unknown key or a
value of the wrong type fails while composing, with OmegaConf naming the full key. The
cross-field rules that a type cannot express live in :func:`validate`, which runs before any
process group or model exists and raises :class:`ConfigError` naming the key to change.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from moss_train.errors import ConfigError
from moss_train.model.config import ModelConfig, validate_model_config
from moss_train.model.lora import LORA_TARGETS

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-autocast")
WANDB_MODES = ("offline", "online", "disabled")
RESUME_MODES = ("auto", "never")


@dataclass
class StageConfig:
    name: str = "pretrain"
    # Initial weights: a moss-train checkpoint (step, checkpoints or run directory), an HF
    # CodeGen directory, or a MOSS release directory; its architecture replaces the recipe's
    # model shapes (see moss_train/checkpoint/init.py). null: fresh initialisation.
    init_from: Optional[str] = None
    # Let transformers run code shipped with init_from's tokenizer; off by default (a MOSS
    # release's tokenizer is read from its files without it).
    trust_remote_code: bool = False
    # The run's tokenizer may give other tokens than init_from's at the same ids (their embedding
    # rows then belong to other tokens). Off: that is a recipe error; growth at the end is fine.
    allow_different_vocab: bool = False


@dataclass
class DataSourceConfig:
    """One source of a weighted pretraining blend (see moss_train/data/blend.py)."""

    weight: float = 1.0  # share of the blend's tokens, relative to the other sources' weights
    train_shards: List[str] = field(default_factory=list)
    valid_shards: List[str] = field(default_factory=list)


@dataclass
class DataConfig:
    name: str = "custom"
    # Shard prefixes, token dataset folders (moss-data tokenize --out) or glob patterns of
    # either, relative to `root` (see moss_train/data/shards.py, data/token_datasets.py).
    train_shards: List[str] = field(default_factory=list)
    valid_shards: List[str] = field(default_factory=list)
    # Pretraining blend: source name -> weight + shards, instead of train_shards (one stream).
    sources: Dict[str, DataSourceConfig] = field(default_factory=dict)
    on_exhausted: str = "repeat"  # a blend source out of samples: "repeat" (new epoch) or "stop"
    packing: str = "stream"  # "stream": cut at seq_len windows; "documents": never cut a document
    root: str = "."
    tokenizer: str = MISSING
    seq_len: int = 256
    # The command that produces the data, quoted in the error when a shard is missing.
    prepare_hint: str = ""


@dataclass
class TrainerConfig:
    seed: int = 1234
    max_steps: int = 100
    micro_batch_size: int = 4  # sequences per rank per forward pass
    global_batch_size: int = 8  # sequences per optimizer step over all ranks
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # PRECISIONS; auto: GPU bf16, CPU bf16-autocast where it pays (engine/cpu.py), else fp32
    eval_every: int = 0  # 0: evaluate only at the end
    eval_at_start: bool = False  # also evaluate the initial weights (step 0) of a fresh run
    # Held-out samples per evaluation: the first N of the eval set, rounded down to a multiple of
    # micro_batch_size x ranks so any number of ranks evaluates the same samples.
    eval_samples: int = 64
    log_every: int = 1
    resume: str = "auto"  # "auto", "never", or a checkpoint directory
    threads: int = 0  # torch intra-op threads per process on CPU; 0 = cores / local ranks
    # CPU only: keep freed memory in the process instead of unmapping and re-faulting it every
    # step (see engine/setup.py: tune_cpu).
    keep_freed_memory: bool = True


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    # One process has nothing to partition: ZeRO-3 there runs as DeepSpeed's ZeRO-2, the same
    # states without stage 3's per-parameter hooks (engine/setup.py: zero_stage_for). True keeps
    # stage 3 in one process as well.
    zero3_on_one_rank: bool = False
    # Raw DeepSpeed config entries merged last, for settings this schema does not name.
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps; 0: only at the end
    keep_last: int = 2
    save_final: bool = True


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # one of WANDB_MODES
    project: str = "moss-train"
    group: Optional[str] = None
    progress_bar: bool = True
    tensorboard: bool = False  # also write the metrics as TensorBoard events ({run.output_dir}/tensorboard)
    # Peak FLOP/s per device for MFU, in TFLOP/s; null: known GPUs by name, measured on CPU.
    peak_tflops: Optional[float] = None


@dataclass
class SFTConfig:
    """Supervised fine-tuning (stage=sft, stage=preference); see moss_train/data/sft.py."""

    # default: loss on inner thoughts, commands and replies; moss_reference: the original MOSS
    # recipe (everything but the meta instruction and the content of plugin results).
    loss_mask: str = "default"
    # packed: several conversations per data.seq_len sequence, attention kept per conversation;
    # padded: one conversation per row, padded to the longest of its micro-batch.
    packing: str = "packed"
    # padded only: length_grouped (similar lengths per micro-batch) or random (the original recipe).
    padded_order: str = "length_grouped"
    # Conversations longer than data.seq_len: turns (keep the whole turns that fit, as the
    # original recipe) or skip; one whose first turn does not fit is skipped either way.
    truncation: str = "turns"
    # Report loss and accuracy per category (loss_cat_<name>) where the data has categories.
    per_category_metrics: bool = True


SFT_LOSS_MASKS = ("default", "moss_reference")
SFT_PACKING = ("packed", "padded")
SFT_PADDED_ORDERS = ("length_grouped", "random")
SFT_TRUNCATION = ("turns", "skip")


@dataclass
class PreferenceConfig:
    """The preference-aware stages: reward, tag, preference (tag-conditioned SFT) and dpo."""

    # reward: per pair -log sigmoid(r_chosen - r_rejected - margin_scale * margin), the margin
    # from the pair data (a score difference); 0: plain Bradley-Terry.
    margin_scale: float = 0.0
    # dpo: the frozen reference model (null: stage.init_from), beta, and the loss variant.
    reference: Optional[str] = None
    beta: float = 0.1
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    # tag: the reward model (a stage=reward checkpoint) scores every assistant turn of the
    # dialogue files in tag_inputs (jsonl, moss003 / messages / alpaca); quality levels 1..levels
    # by quantile thresholds over the first file's scores, applied to every file.
    reward_model: Optional[str] = None
    tag_inputs: List[str] = field(default_factory=list)
    tag_limit: int = 0  # tag only the first N dialogues of each file (a trial, or enough for the steps); 0: all
    levels: int = 5
    # How a tag enters the prompt: a line appended to the meta instruction ({level}, {levels}).
    quality_template: str = "- Response quality: {level}/{levels}\n"


@dataclass
class LoraConfig:
    """LoRA through peft (moss_train/model/lora.py): adapters on the blocks' projections, the base
    frozen; for the fine-tuning stages (sft, preference, dpo, reward) from stage.init_from."""

    r: int = 0  # the adapters' rank; 0: no adapters, full fine-tuning
    alpha: float = 16.0  # the update B @ A is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))


LORA_STAGES = ("sft", "preference", "dpo", "reward")


@dataclass
class ClusterConfig:
    """The machines a run is planned for (moss-plan) and launched on (launch/); recipes/cluster/.

    Only collective_timeout_s changes how training runs; the rest describes the hardware to the
    planner (moss_train/plan.py): memory, peak FLOP/s and link rates per GPU.
    """

    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 1
    gpu: str = ""  # the accelerator, in words
    gpu_memory_gib: Optional[float] = None  # per GPU; null: unknown, the planner cannot say if it fits
    peak_tflops: Optional[float] = None  # dense bf16 TFLOP/s per GPU
    cpu_memory_gib: Optional[float] = None  # per node: where ZeRO offload keeps optimizer states
    intra_node_gb_per_s: Optional[float] = None  # per GPU, one direction (NVLink)
    inter_node_gb_per_s: Optional[float] = None  # per GPU, one direction (InfiniBand / RoCE NICs)
    interconnect: str = ""  # notes for people: fabric, NICs, NCCL settings that matter
    mfu: float = 0.4  # model FLOPs utilisation the planner assumes for step time and tokens/day
    reserve_gib: float = 4.0  # per GPU: CUDA context, NCCL buffers, allocator fragmentation
    # A collective that waits longer than this for another rank fails the job (e.g. a rank died
    # without the launcher noticing), instead of hanging until the allocation runs out.
    collective_timeout_s: int = 1800


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/${run.name}"


@dataclass
class MossTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def recipes_dir() -> Path:
    """The recipe tree: $MOSS_RECIPES, else the repository's recipes/ next to the package."""
    configured = os.environ.get("MOSS_RECIPES")
    path = Path(configured) if configured else Path(__file__).resolve().parent.parent / "recipes"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"no recipe tree at {path} (set MOSS_RECIPES to the recipes/ folder)")
    return path


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="moss_train_schema", node=MossTrainConfig)


@dataclass
class RecipeArgs:
    """A command line of moss-train / moss-plan: which recipe, and its Hydra overrides."""

    config_name: str = "config"
    overrides: List[str] = field(default_factory=list)
    print_only: bool = False  # --cfg: print the composed recipe and exit
    help: bool = False
    local_rank: Optional[int] = None  # --local_rank N, as the deepspeed launcher adds it


def parse_recipe_args(argv: List[str], recipe_positional: bool = False) -> RecipeArgs:
    """`[RECIPE] [--config-name NAME] [--cfg] [--local_rank N] [-h] OVERRIDES...`: every
    argument that is not one of these options is a Hydra override, in order. With
    `recipe_positional`, a first argument without ``=`` names the recipe (``--config-name`` wins)."""
    import argparse

    argv = list(argv)
    config_name = "config"
    if recipe_positional and argv and "=" not in argv[0] and not argv[0].startswith("-"):
        config_name = argv.pop(0).removesuffix(".yaml")
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config-name", dest="config_name", default=config_name)
    parser.add_argument("--cfg", dest="print_only", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int)
    parser.add_argument("-h", "--help", dest="help", action="store_true")
    known, overrides = parser.parse_known_args(argv)
    return RecipeArgs(overrides=overrides, **vars(known))


def compose(overrides: List[str], config_name: str = "config") -> DictConfig:
    """Compose a recipe from recipes/ with Hydra overrides, typed by MossTrainConfig.

    Raises ConfigError naming the key when a key is unknown or a value has the wrong type.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except Exception as error:  # Hydra wraps OmegaConf's errors; surface the key they name
        raise _as_config_error(error) from error
    return cfg


def _as_config_error(error: Exception) -> ConfigError:
    """Turn a Hydra / OmegaConf composition error into one message that names the key."""
    from omegaconf.errors import OmegaConfBaseException

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is not None and getattr(cause, "full_key", None):
        first_line = str(cause).splitlines()[0]
        return ConfigError(cause.full_key, first_line)
    import re

    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    missing_option = re.search(r"Could not find '([\w-]+)/([^']+)'", first_line)
    if missing_option:
        group, option = missing_option.groups()
        available = sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))
        return ConfigError(group, f"no recipe {group}/{option}.yaml; available: {', '.join(available)}")
    override = re.search(r"override '([^'=]+)", first_line)
    return ConfigError(override.group(1) if override else "recipe", first_line)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(cfg: DictConfig | MossTrainConfig, world_size: Optional[int] = None) -> None:
    """Cross-field checks that types cannot express; raise ConfigError naming the key."""
    world_size = world_size or world_size_from_env()
    validate_model_config(cfg.model, prefix="model")
    _validate_trainer(cfg.trainer, world_size)
    _validate_data(cfg.data, cfg.model, needs_shards=cfg.stage.name != "tag")  # tag reads preference.tag_inputs
    _validate_deepspeed(cfg.deepspeed)
    _validate_stage(cfg.stage)
    _validate_sft(cfg.sft)
    _validate_preference(cfg.preference, cfg.stage)
    _validate_lora(cfg.lora, cfg.stage, cfg.preference)
    _validate_cluster(cfg.cluster)
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 saves only at the end)")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must keep at least 1 checkpoint")
    _check_choice(cfg.logging.wandb, WANDB_MODES, "logging.wandb")
    _check(
        not cfg.logging.tensorboard or _importable("tensorboard"),
        "logging.tensorboard",
        "needs the tensorboard package: pip install 'moss-train[tensorboard]'",
    )
    _check(
        cfg.logging.peak_tflops is None or cfg.logging.peak_tflops > 0,
        "logging.peak_tflops",
        "must be positive (or null to detect it)",
    )


def check_paths(cfg: MossTrainConfig) -> None:
    """The files this machine must have, checked before any process group is set up (validate
    checks the recipe alone, as moss-plan does for another machine): the data root and the
    tokenizer. ConfigError naming the key, with the data's prepare command."""
    hint = f"; prepare the data with: {cfg.data.prepare_hint}" if cfg.data.prepare_hint else ""
    if cfg.stage.name != "tag":  # tag reads preference.tag_inputs, checked by validate
        _check(Path(cfg.data.root).is_dir(), "data.root", f"no such directory: {cfg.data.root}{hint}")
    _check(Path(cfg.data.tokenizer).exists(), "data.tokenizer", f"no tokenizer at {cfg.data.tokenizer}{hint}")


def recipe_tokenizer(cfg: MossTrainConfig):
    """The tokenizer data.tokenizer names: a MOSS tokenizer directory or any HF tokenizer directory."""
    from moss_train.tokenizer import load_tokenizer

    path = Path(cfg.data.tokenizer)
    hint = f"; prepare the data with: {cfg.data.prepare_hint}" if cfg.data.prepare_hint else ""
    _check(path.exists(), "data.tokenizer", f"no tokenizer at {path}{hint}")
    return load_tokenizer(path)


def _validate_trainer(trainer: TrainerConfig, world_size: int) -> None:
    _check(trainer.max_steps > 0, "trainer.max_steps", f"must be positive, got {trainer.max_steps}")
    _check(trainer.micro_batch_size > 0, "trainer.micro_batch_size", "must be positive")
    per_step = trainer.micro_batch_size * world_size
    _check(
        trainer.global_batch_size > 0 and trainer.global_batch_size % per_step == 0,
        "trainer.global_batch_size",
        f"{trainer.global_batch_size} is not a multiple of micro_batch_size ({trainer.micro_batch_size})"
        f" x data-parallel ranks ({world_size}) = {per_step}",
    )
    _check(trainer.lr > 0, "trainer.lr", "must be positive")
    _check(0 <= trainer.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]")
    _check(trainer.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
    _check(trainer.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
    _check(0 <= trainer.adam_beta1 < 1, "trainer.adam_beta1", "must be in [0, 1)")
    _check(0 <= trainer.adam_beta2 < 1, "trainer.adam_beta2", "must be in [0, 1)")
    _check(trainer.grad_clip >= 0, "trainer.grad_clip", "must be >= 0 (0 disables clipping)")
    _check_choice(trainer.precision, PRECISIONS, "trainer.precision")
    _check(trainer.eval_every >= 0, "trainer.eval_every", "must be >= 0")
    _check(trainer.eval_samples >= 0, "trainer.eval_samples", "must be >= 0 (0 disables evaluation)")
    _check(trainer.log_every > 0, "trainer.log_every", "must be positive")
    _check(trainer.threads >= 0, "trainer.threads", "must be >= 0")
    if trainer.precision == "fp16":
        import torch

        _check(
            torch.cuda.is_available(), "trainer.precision", "fp16 needs a CUDA GPU; use bf16-autocast or fp32 on CPU"
        )


def _validate_data(data: DataConfig, model: ModelConfig, needs_shards: bool = True) -> None:
    _check(data.seq_len > 0, "data.seq_len", "must be positive")
    _check(
        data.seq_len <= model.n_positions,
        "data.seq_len",
        f"{data.seq_len} is longer than the model's n_positions ({model.n_positions})",
    )
    _check(
        len(data.train_shards) > 0 or len(data.sources) > 0 or not needs_shards,
        "data.train_shards",
        "no training shards configured (data.train_shards, or data.sources for a weighted blend)",
    )
    _check(
        not (data.train_shards and data.sources),
        "data.sources",
        "set either data.train_shards (one stream) or data.sources (a weighted blend), not both",
    )
    for name, source in data.sources.items():
        key = f"data.sources.{name}"
        _check(re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None, key, "source names are letters, digits, _ and -")
        _check(
            math.isfinite(source.weight) and source.weight > 0,
            f"{key}.weight",
            f"must be positive, got {source.weight}",
        )
        _check(len(source.train_shards) > 0, f"{key}.train_shards", "no training shards configured for this source")
    _check_choice(data.on_exhausted, ("repeat", "stop"), "data.on_exhausted")
    _check_choice(data.packing, ("stream", "documents"), "data.packing")


def _validate_cluster(cluster: ClusterConfig) -> None:
    _check(cluster.nodes >= 1, "cluster.nodes", f"must be >= 1, got {cluster.nodes}")
    _check(cluster.gpus_per_node >= 1, "cluster.gpus_per_node", f"must be >= 1, got {cluster.gpus_per_node}")
    for key in ("gpu_memory_gib", "peak_tflops", "cpu_memory_gib", "intra_node_gb_per_s", "inter_node_gb_per_s"):
        value = getattr(cluster, key)
        _check(value is None or value > 0, f"cluster.{key}", f"must be positive (or null: unknown), got {value}")
    _check(0 < cluster.mfu <= 1, "cluster.mfu", f"must be in (0, 1], got {cluster.mfu}")
    _check(cluster.reserve_gib >= 0, "cluster.reserve_gib", f"must be >= 0, got {cluster.reserve_gib}")
    _check(cluster.collective_timeout_s > 0, "cluster.collective_timeout_s", "must be positive (seconds)")


def _validate_preference(pref: PreferenceConfig, stage: StageConfig) -> None:
    _check(
        math.isfinite(pref.margin_scale) and pref.margin_scale >= 0,
        "preference.margin_scale",
        "must be >= 0 (0: plain Bradley-Terry)",
    )
    _check(math.isfinite(pref.beta) and pref.beta > 0, "preference.beta", f"must be positive, got {pref.beta}")
    _check_choice(pref.dpo_loss, ("sigmoid", "ipo"), "preference.dpo_loss")
    _check(pref.levels >= 2, "preference.levels", f"needs at least 2 quality levels, got {pref.levels}")
    try:
        line = pref.quality_template.format(level=1, levels=pref.levels)
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(
            "preference.quality_template", f"must format with {{level}} and {{levels}} only: {error}"
        ) from None
    _check(
        line.endswith("\n") and "{level}" in pref.quality_template,
        "preference.quality_template",
        "must hold {level} and end with a newline (a meta-instruction line)",
    )
    for key in ("reference", "reward_model"):
        path = getattr(pref, key)
        _check(path is None or Path(path).exists(), f"preference.{key}", f"no checkpoint or model directory at {path}")
    if stage.name == "dpo":
        _check(
            pref.reference is not None or stage.init_from is not None,
            "preference.reference",
            "stage=dpo needs a reference model (or stage.init_from)",
        )
    if stage.name == "tag":
        _check(
            pref.reward_model is not None,
            "preference.reward_model",
            "stage=tag needs the reward model (a stage=reward checkpoint)",
        )
        _check(len(pref.tag_inputs) > 0, "preference.tag_inputs", "stage=tag needs dialogue files (jsonl) to tag")
        for path in pref.tag_inputs:
            _check(Path(path).is_file(), "preference.tag_inputs", f"no dialogue file at {path}")
        _check(pref.tag_limit >= 0, "preference.tag_limit", f"must be >= 0 (0: every dialogue), got {pref.tag_limit}")
        names = [Path(p).name.split(".")[0] for p in pref.tag_inputs]
        _check(
            len(set(names)) == len(names),
            "preference.tag_inputs",
            f"file names must differ before their first dot (they name the output splits): {names}",
        )


def _validate_lora(lora: LoraConfig, stage: StageConfig, pref: PreferenceConfig) -> None:
    _check(lora.r >= 0, "lora.r", f"must be >= 0 (0: no adapters), got {lora.r}")
    if lora.r == 0:
        return
    _check(math.isfinite(lora.alpha) and lora.alpha > 0, "lora.alpha", f"must be positive, got {lora.alpha}")
    _check(0 <= lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    unknown = sorted(set(lora.target_modules) - set(LORA_TARGETS))
    _check(
        len(lora.target_modules) > 0 and not unknown,
        "lora.target_modules",
        f"{unknown or 'none'}: the adaptable projections are {', '.join(LORA_TARGETS)}",
    )
    _check(
        stage.name in LORA_STAGES,
        "lora.r",
        f"adapters are for the fine-tuning stages ({', '.join(LORA_STAGES)}), not stage={stage.name}",
    )
    _check(stage.init_from is not None, "stage.init_from", "LoRA trains adapters on a base model: set stage.init_from")
    if stage.name == "dpo":
        _check(
            pref.reference in (None, stage.init_from),
            "preference.reference",
            "with LoRA the reference is the base (stage.init_from) with its adapters off; "
            "leave preference.reference unset",
        )


def _validate_sft(sft: SFTConfig) -> None:
    _check_choice(sft.loss_mask, SFT_LOSS_MASKS, "sft.loss_mask")
    _check_choice(sft.packing, SFT_PACKING, "sft.packing")
    _check_choice(sft.padded_order, SFT_PADDED_ORDERS, "sft.padded_order")
    _check_choice(sft.truncation, SFT_TRUNCATION, "sft.truncation")


def _validate_stage(stage: StageConfig) -> None:
    _check(
        stage.init_from is None or Path(stage.init_from).exists(),
        "stage.init_from",
        f"no checkpoint or model directory at {stage.init_from}",
    )
    _check(
        not stage.trust_remote_code or stage.init_from is not None,
        "stage.trust_remote_code",
        "applies to the tokenizer of stage.init_from, which is not set",
    )


def _validate_deepspeed(ds: DeepSpeedConfig) -> None:
    _check_choice(ds.zero_stage, (0, 1, 2, 3), "deepspeed.zero_stage")
    _check(
        not ds.offload_optimizer or ds.zero_stage >= 1,
        "deepspeed.offload_optimizer",
        "optimizer offload needs ZeRO stage 1, 2 or 3",
    )
    _check(
        not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param", "parameter offload needs ZeRO stage 3"
    )


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _check_choice(value: Any, choices: tuple, key: str) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def to_object(cfg: DictConfig) -> MossTrainConfig:
    """The composed recipe as typed dataclasses (what the rest of the code reads)."""
    _reject_unknown_keys(cfg, MossTrainConfig, "")
    return OmegaConf.to_object(cfg)


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Hydra's `+key=value` opens the struct flag; keys the schema lacks must still fail."""
    import dataclasses
    import typing

    field_types = typing.get_type_hints(schema)
    for key in node.keys():
        full_key = f"{prefix}{key}"
        if key not in field_types:
            raise ConfigError(full_key, f"unknown key; {schema.__name__} has: {', '.join(field_types)}")
        if dataclasses.is_dataclass(field_types[key]) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], field_types[key], f"{full_key}.")
        elif typing.get_origin(field_types[key]) is dict and isinstance(node[key], DictConfig):
            value_type = typing.get_args(field_types[key])[1]  # e.g. data.sources: name -> DataSourceConfig
            if dataclasses.is_dataclass(value_type):
                for name in node[key].keys():
                    _reject_unknown_keys(node[key][name], value_type, f"{full_key}.{name}.")
