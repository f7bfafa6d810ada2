"""From a validated recipe to a DeepSpeed engine: config dict, precision, optimizer, schedule."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from moss_train.config import DeepSpeedConfig, MossTrainConfig
from moss_train.distributed import DistInfo, launch_rank
from moss_train.engine.cpu import (
    BF16_PRECISIONS,
    bf16_attention_fp32_below,
    bf16_matmuls_pay,
    bf16_slowdown_warning,
)
from moss_train.model.codegen import attend_in_fp32_below


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' means bf16 weights on a GPU; on a CPU, bf16 autocast where bf16 matmuls measure
    clearly faster than fp32 (engine/cpu.py says why measured), else fp32. Rank 0 decides for
    every rank: one precision per run, whatever a rank's own measurement would have said. An
    explicit bf16 is kept, with a warning where this CPU's bf16 matmuls measure slower than fp32."""
    if requested != "auto":
        if device.type == "cpu" and requested in BF16_PRECISIONS and launch_rank() == 0:
            warning = bf16_slowdown_warning()  # taken as asked, but said once
            if warning:
                print(warning, flush=True)
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return rank_0_decides(lambda: "bf16-autocast" if bf16_matmuls_pay() else "fp32")


def tune_cpu_attention(cfg: MossTrainConfig, precision: str, dist_info: DistInfo) -> None:
    """Under bf16 autocast on a CPU, causal attention shorter than the length where this CPU's
    bf16 SDPA stops losing to fp32 runs in fp32 (model/codegen.py: attend_in_fp32_below). SFT
    attends per packed document, often a few hundred tokens, where one EPYC's bf16 kernel took
    twice fp32's time. Rank 0 measures (once per machine, cached), every rank uses its answer."""
    below = 0
    if precision == "bf16-autocast" and dist_info.device.type == "cpu":
        heads, width = cfg.model.n_head, cfg.model.n_embd // cfg.model.n_head
        below = rank_0_decides(lambda: bf16_attention_fp32_below(heads, width, cfg.data.seq_len))
        if below and dist_info.is_main:
            print(
                f"[moss-train] bf16 autocast: causal attention under {below} tokens runs in fp32 "
                "(measured faster there on this CPU)",
                flush=True,
            )
    attend_in_fp32_below(below)


def rank_0_decides(decide):
    """decide() on rank 0 alone, its answer on every rank (a run's ranks must not disagree)."""
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    choice = [None]
    if not distributed or torch.distributed.get_rank() == 0:
        choice[0] = decide()
    if distributed:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0]


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def zero_stage_for(ds: DeepSpeedConfig, world_size: int, precision: str = "fp32") -> int:
    """The ZeRO stage DeepSpeed runs: the recipe's, except ZeRO-3 in one process with fp32
    weights (fp32, bf16-autocast), which runs as ZeRO-2. With one rank each "shard" is the whole
    tensor, so ZeRO-3's gathering and releasing of every parameter around every module, and its
    re-partitioning after each step, buy nothing (tiny model, one process: 60 ms per step against
    26 at ZeRO-2 on an AVX2 EPYC, bench/RESULTS.md); and building a ZeRO-3 engine replaces
    torch.nn.functional.linear, for the whole process, with DeepSpeed's memory-efficient linear,
    which other models in the process then run too. ZeRO-2 then holds the same states:
    fp32 weights, fp32 master weights and Adam's moments in one flat partition, fp32 gradients.
    With 16-bit weights (bf16, fp16: a GPU's precision) ZeRO-2 would hold 2 more bytes per
    parameter of 16-bit gradients than ZeRO-3 (moss_train/plan.py, as DeepSpeed's estimator),
    which a one-GPU run sized for ZeRO-3 may not have: stage 3 stays. So does parameter offload
    (stage 3 only) and deepspeed.zero3_on_one_rank. ZeRO-2 checkpoints resume on any number of
    ranks at stage 3 through the universal checkpoint (checkpoint/store.py)."""
    fp32_weights = precision in ("fp32", "bf16-autocast")
    if ds.zero_stage == 3 and world_size == 1 and fp32_weights and not ds.offload_param and not ds.zero3_on_one_rank:
        return 2
    return ds.zero_stage


def deepspeed_config(cfg: MossTrainConfig, precision: str, world_size: int) -> dict:
    trainer, ds = cfg.trainer, cfg.deepspeed
    stage = zero_stage_for(ds, world_size, precision)
    zero: dict = {"stage": stage}
    # Where one process runs the ZeRO-3 recipe as ZeRO-2 there is no reduction at all: overlapping it
    # with backward (a second bucket) and copying each gradient into a contiguous reduction buffer
    # only add copies and buffers (tiny model, AVX2 EPYC: 27 against 28 ms a step; bench/RESULTS.md).
    one_rank_as_zero2 = stage != ds.zero_stage
    if stage >= 1:
        zero.update(
            overlap_comm=ds.overlap_comm and not one_rank_as_zero2,
            contiguous_gradients=ds.contiguous_gradients and not one_rank_as_zero2,
            reduce_bucket_size=ds.reduce_bucket_size,
        )
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            # Export consolidates with DeepSpeed's own zero_to_fp32 tooling, not at save time.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    pin = torch.cuda.is_available()
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_batch_size": trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.global_batch_size // (trainer.micro_batch_size * world_size),
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # the engine's own metrics replace DeepSpeed's prints
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, dict(ds.extra))


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def model_construction_context(ds_config: dict):
    """ZeRO-3 builds each parameter straight into its shard, so no rank holds the whole model."""
    if ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


def _full_shape(param: nn.Parameter) -> torch.Size:
    # Under ZeRO-3 a parameter's data is an empty shard; DeepSpeed keeps the real shape here.
    return getattr(param, "ds_shape", param.shape)


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on biases and LayerNorms."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if len(_full_shape(param)) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: MossTrainConfig) -> torch.optim.Optimizer:
    trainer = cfg.trainer
    groups = optimizer_param_groups(model, trainer.weight_decay)
    kwargs = dict(lr=trainer.lr, betas=(trainer.adam_beta1, trainer.adam_beta2), eps=trainer.adam_eps)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # fused: one pass over each parameter tensor for the whole update, on CPU (AVX512) as on
    # CUDA; the default on CPU is a loop of ~10 elementwise passes. Measured on the 60M model's
    # flat ZeRO partition (2 CPU cores): 0.88 s -> 0.15 s per step, parameters equal to 1e-7.
    return torch.optim.AdamW(groups, fused=True, **kwargs)


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine down to min_ratio at max_steps.

    A class (not a lambda) so LambdaLR's state_dict stores it and resume restores it.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(cfg: MossTrainConfig):
    trainer = cfg.trainer
    schedule = WarmupCosine(trainer.warmup_steps, trainer.max_steps, trainer.min_lr_ratio)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def initialize_engine(model: nn.Module, cfg: MossTrainConfig, ds_config: dict):
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg),
        lr_scheduler=scheduler_factory(cfg),
        config=ds_config,
    )
    return engine, scheduler


def add_lora(model: nn.Module, cfg: MossTrainConfig, loaded, dist: DistInfo) -> dict:
    """LoRA adapters (cfg.lora) on the model stage.init_from was just loaded into (`loaded`: the
    load plan); what checkpoints record of them: the settings and the base they adapt."""
    from dataclasses import asdict

    from moss_train.errors import ConfigError
    from moss_train.model import lora

    if loaded.fresh_rows:
        raise ConfigError(
            "lora.r",
            f"the tokenizer adds {len(loaded.fresh_rows)} tokens to {cfg.stage.init_from}'s vocabulary, and LoRA "
            "leaves the embeddings frozen: their rows would never train (fine-tune fully once, then LoRA from there)",
        )
    lora.add_adapters(model, cfg.lora, seed=cfg.trainer.seed)
    trainable, total = lora.trainable_counts(model)
    if dist.is_main:
        print(
            f"[moss-train] LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}: "
            f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)",
            flush=True,
        )
    return {**asdict(cfg.lora), "target_modules": list(cfg.lora.target_modules), "base": loaded.base}


def build_and_load(build, cfg: MossTrainConfig, tokenizer, dist: DistInfo, ds_config: dict):
    """`build(cfg, tokenizer)` built under the ZeRO config (ZeRO-3: straight into its shards) and
    given stage.init_from's weights (checkpoint/init.py); (model, the load plan or None)."""
    from moss_train.checkpoint import init as initial_weights

    with model_construction_context(ds_config):
        model = build(cfg, tokenizer)
    return model, initial_weights.load_initial_weights(model, cfg, tokenizer, dist)


def frozen_model(build, init_from: str, *, cfg: MossTrainConfig, tokenizer, dist: DistInfo, ds_config: dict):
    """A model a stage only runs forward (a DPO reference, the reward model that tags): built by
    `build(cfg, tokenizer)` with init_from's architecture and weights, under the run's ZeRO
    config (ZeRO-3: partitioned like the trained model, gathered layer by layer in forward), no
    optimizer, in eval mode. Every rank must call it, and run its forwards, together."""
    import dataclasses

    import deepspeed

    from moss_train.checkpoint import init as initial_weights

    cfg = dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, init_from=str(init_from)))
    cfg = initial_weights.adopt_model_config(cfg, tokenizer, dist)
    model, _ = build_and_load(build, cfg, tokenizer, dist, ds_config)
    for param in model.parameters():
        param.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=_frozen_config(ds_config))
    engine.eval()
    return engine


def _frozen_config(ds_config: dict) -> dict:
    """ZeRO 1 and 2 shard optimizer states and gradients, which a frozen model has none of
    (DeepSpeed refuses them without an optimizer): it runs without ZeRO there. ZeRO-3 shards
    its weights, so it keeps it."""
    if ds_config["zero_optimization"]["stage"] in (1, 2):
        return {**ds_config, "zero_optimization": {"stage": 0}}
    return ds_config


def frozen_models(specs: dict, cfg: MossTrainConfig, tokenizer, dist: DistInfo, ds_config: dict) -> dict:
    """The frozen models a stage declared (engine/stage.py: FrozenModel), by name."""
    return {
        name: frozen_model(spec.build, spec.init_from, cfg=cfg, tokenizer=tokenizer, dist=dist, ds_config=ds_config)
        for name, spec in specs.items()
    }


def tune_cpu(cfg: MossTrainConfig, dist_info: DistInfo) -> None:
    """On CPU: share the cores between the processes of a node, and keep freed memory.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each
    training step page-faults its activations, gradients and ZeRO buffers in again (measured:
    a third of a ZeRO-3 step of the 60M model was kernel time). Allocating from the heap and
    keeping up to 1 GiB of freed memory removes that.
    """
    if dist_info.device.type != "cpu":
        return
    import os

    threads = cfg.trainer.threads or max(1, (os.cpu_count() or 1) // max(1, dist_info.local_world_size))
    torch.set_num_threads(threads)
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """glibc mallopt: no mmap for large blocks, trim the heap only above 1 GiB free."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**30) and mallopt(m_top_pad, 2**28))
