"""The one training loop. Every stage runs through `train(cfg, stage)`.

Per optimizer step: this rank's micro-batches are fetched first (their target tokens are counted
and summed over ranks), then each micro-batch's loss SUM is scaled by world_size / global_count
before DeepSpeed's backward. DeepSpeed averages gradients over ranks, so the gradient the
optimizer sees is exactly that of the mean loss over all target tokens of the global batch —
not a mean of per-micro-batch means — however the batch is split over ranks and micro-batches.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from moss_train.checkpoint import init as initial_weights
from moss_train.checkpoint.store import CheckpointManager, check_same_model
from moss_train.config import MossTrainConfig
from moss_train.data.sampler import GlobalBatchPlan
from moss_train.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed, rank_batches
from moss_train.engine import setup
from moss_train.engine.metrics import MetricsLogger, ThroughputWindow, memory_gb, peak_tflops
from moss_train.engine.stage import JOB, TRAIN, JobStage, LossTerms, Stage, StageContext, StageData, TrainingStage
from moss_train.model import lora
from moss_train.model.config import flops_per_token, head_flops_per_row


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class MetricSums:
    """Named (sum, count) pairs over micro-batches, reduced over ranks into means."""

    def __init__(self):
        self.totals: dict[str, list[torch.Tensor]] = {}

    def add(self, terms: LossTerms) -> None:
        self._add("loss", terms.loss_sum, terms.num_targets)
        for name, value in terms.sums.items():
            self._add(name, value, terms.counts.get(name, terms.num_targets))

    def _add(self, name: str, value: torch.Tensor, count: torch.Tensor) -> None:
        pair = torch.stack([value.detach().double(), torch.as_tensor(count, device=value.device).double()])
        self.totals[name] = self.totals[name] + pair if name in self.totals else pair

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means over all ranks. Ranks may report different names (a source or category absent
        from one rank's batch); the union is reduced, missing ones counting as zero."""
        names = sorted(set().union(*all_gather_objects(sorted(self.totals))))
        zero = torch.zeros(2, dtype=torch.float64, device=device)
        stacked = torch.stack([self.totals.get(n, zero).to(device) for n in names]) if names else zero[:0]
        reduced = all_reduce_sum(stacked, device)
        return {n: (s / c).item() if c > 0 else math.nan for n, (s, c) in zip(names, reduced)}


class Trainer:
    """Trains a TrainingStage (engine/stage.py). The stage gets a StageContext; the trainer calls
    its declared methods in this order: frozen_models, build_data, use_frozen_models (with the
    frozen models, only when it declared any; they are dropped after it), build_model,
    use_engine, then loss per micro-batch."""

    def __init__(self, cfg: MossTrainConfig, stage: TrainingStage, dist_info: DistInfo | None = None):
        if stage.kind != TRAIN:
            raise TypeError(
                f"stage {stage.name!r} is a {stage.kind}, not a training stage: run it with engine.loop.train"
            )
        self.stage = stage
        self.dist = dist_info or init_distributed()
        setup.tune_cpu(cfg, self.dist)
        self.output_dir = Path(cfg.run.output_dir)
        self.precision = setup.resolve_precision(cfg.trainer.precision, self.dist.device)
        self.ds_config = setup.deepspeed_config(cfg, self.precision, self.dist.world_size)

        tokenizer = stage.load_tokenizer(cfg)
        # stage.init_from: the checkpoint's architecture replaces the recipe's model shapes.
        self.cfg = cfg = initial_weights.adopt_model_config(cfg, tokenizer, self.dist)
        setup.tune_cpu_attention(cfg, self.precision, self.dist)
        ctx = StageContext(cfg, tokenizer, self.dist)
        frozen_specs = stage.frozen_models(ctx)
        self.data: StageData = stage.build_data(ctx)
        ctx = replace(ctx, data=self.data)
        if frozen_specs:  # e.g. DPO's reference: built under the same ZeRO config, gone before the trained model exists
            stage.use_frozen_models(
                replace(ctx, frozen=setup.frozen_models(frozen_specs, cfg, tokenizer, self.dist, self.ds_config))
            )
        seed_everything(cfg.trainer.seed)  # identical initial weights on every rank and run
        model, loaded = setup.build_and_load(
            stage.build_model, cfg, tokenizer, self.dist, self.ds_config
        )  # ZeRO-3: per parameter
        self.model_config = model.config
        self.lora_state = setup.add_lora(model, cfg, loaded, self.dist) if cfg.lora.r else None
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints",
            cfg.checkpoint.keep_last,
            self.dist,
            trainable_only=self.lora_state is not None,
        )
        self.resume_from = self._resume_path()
        self.universal_resume = self.resume_from is not None and self.checkpoints.needs_universal(
            self.resume_from, self.ds_config["zero_optimization"]["stage"]
        )
        if self.universal_resume:  # another number of ranks or ZeRO stage: DeepSpeed re-cuts its shards
            self.ds_config = {
                **self.ds_config,
                "checkpoint": {**self.ds_config.get("checkpoint", {}), "load_universal": True},
            }
        self.engine, self.scheduler = setup.initialize_engine(model, cfg, self.ds_config)
        self.ctx = replace(ctx, engine=self.engine)
        stage.use_engine(self.ctx)  # e.g. DPO with LoRA: the reference is this model, adapters off
        seed_everything(cfg.trainer.seed + self.dist.rank)  # per-rank streams for dropout etc.

        self.plan = GlobalBatchPlan(
            num_samples=len(self.data.train),
            global_batch_size=cfg.trainer.global_batch_size,
            micro_batch_size=cfg.trainer.micro_batch_size,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            seed=cfg.trainer.seed,
            shuffle=self.data.shuffle,
        )
        self.step = 0
        self.samples_consumed = 0
        self.tokens_seen = 0
        self.head_rows_last_step = 0.0  # where the lm_head ran (StageData.count_head_rows), for MFU

    # ---- resume --------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        """The checkpoint trainer.resume names, once its model shapes are known to match."""
        resume = self.cfg.trainer.resume
        if resume == "never":
            return None
        path = self.checkpoints.latest() if resume == "auto" else Path(resume)
        if path is not None:
            check_same_model(path, self.model_config)
        return path

    def maybe_resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        state = self.checkpoints.load(self.engine, path, universal=self.universal_resume)
        if state.get("num_samples") != len(self.data.train) or state.get("seed") != self.cfg.trainer.seed:
            raise RuntimeError(
                f"checkpoint {path} was trained on {state.get('num_samples')} samples with seed "
                f"{state.get('seed')}, this run has {len(self.data.train)} and {self.cfg.trainer.seed}: "
                "its data position does not apply (start a new run directory, or trainer.resume=never)"
            )
        if _adapter_identity(state.get("lora")) != _adapter_identity(self.lora_state):  # adapters fit only their base
            raise RuntimeError(
                f"checkpoint {path} holds adapters for {state.get('lora')}, this run is {self.lora_state}"
            )
        self.step = state["step"]
        self.samples_consumed = state["samples_consumed"]
        self.tokens_seen = state.get("tokens_seen", 0)
        if self.dist.is_main:
            ranks = (
                f" (written by another number of ranks or ZeRO stage, re-cut for {self.dist.world_size} at "
                f"ZeRO-{self.ds_config['zero_optimization']['stage']})"
                if self.universal_resume
                else ""
            )
            print(f"[moss-train] resumed from {path} at step {self.step}{ranks}", flush=True)

    def _client_state(self) -> dict:
        return {
            "step": self.step,
            "samples_consumed": self.samples_consumed,
            "tokens_seen": self.tokens_seen,
            "num_samples": len(self.data.train),
            "seed": self.cfg.trainer.seed,
            "stage": self.cfg.stage.name,
            "model_config": asdict(self.model_config),
            **({"lora": self.lora_state} if self.lora_state else {}),
        }

    # ---- one step ------------------------------------------------------------------------
    def _micro_batches(self) -> list[dict]:
        indices = self.plan.micro_batches_at(self.samples_consumed)
        return [
            _to_device(self.data.collate([self.data.train[int(i)] for i in idx]), self.dist.device) for idx in indices
        ]

    def train_step(self) -> dict:
        batches = self._micro_batches()
        local = [sum(self.data.count_targets(b) for b in batches), sum(self.data.count_head_rows(b) for b in batches)]
        global_targets, self.head_rows_last_step = all_reduce_sum(local, self.dist.device).tolist()
        if global_targets == 0:
            raise RuntimeError(f"step {self.step}: the global batch has no target tokens")
        lr = self.scheduler.get_last_lr()[0]
        loss_scale = self.dist.world_size / global_targets
        sums = MetricSums()
        replicated_norm = None
        for i, batch in enumerate(batches):
            with setup.autocast_context(self.precision, self.dist.device):
                terms = self.stage.loss(self.ctx, self.engine, batch)
            self.engine.backward(terms.loss_sum * loss_scale, scale_wrt_gas=False)
            if i == len(batches) - 1:
                replicated_norm = self._replicated_grad_norm()
            self.engine.step()
            sums.add(terms)
        metrics = sums.reduce(self.dist.device)
        self.step += 1
        self.samples_consumed += self.cfg.trainer.global_batch_size
        self.tokens_seen += self.cfg.trainer.global_batch_size * self.data.tokens_per_sample
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = replicated_norm if grad_norm is None else grad_norm
        metrics.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else math.nan)
        return metrics

    def _replicated_grad_norm(self) -> float | None:
        """ZeRO-0 (plain data parallel) in fp32: DeepSpeed reports no gradient norm, so it is taken
        here from the gradients its last backward of the step all-reduced, before the optimizer
        step clips them (DeepSpeed's own norm under ZeRO 1-3 is also the unclipped one)."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        norms = [p.grad.detach().double().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else None

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        dataset = self.data.eval
        micro, world = self.cfg.trainer.micro_batch_size, self.dist.world_size
        samples = min(self.cfg.trainer.eval_samples, len(dataset) if dataset is not None else 0)
        if samples == 0:
            return {}
        # Every sample counts, so the figure does not depend on the world size. Every rank runs
        # the same number of forward passes (rank_batches): in the last, partial pass a rank left
        # without samples runs sample 0 and drops its sums.
        self.engine.eval()
        sums = MetricSums()
        for indices in rank_batches(samples, micro, self.dist.rank, world):
            batch = _to_device(self.data.collate([dataset[i] for i in (indices or [0])]), self.dist.device)
            with setup.autocast_context(self.precision, self.dist.device):
                terms = self.stage.loss(self.ctx, self.engine, batch)
            if indices:
                sums.add(terms)
        self.engine.train()
        result = {f"eval_{name}": value for name, value in sums.reduce(self.dist.device).items()}
        result["eval_ppl"] = math.exp(min(result["eval_loss"], 50.0))
        result["eval_samples"] = samples
        return result

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        self.maybe_resume()
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        logger = MetricsLogger(
            self.output_dir,
            enabled=self.dist.is_main,
            total_steps=cfg.trainer.max_steps,
            start_step=self.step,
            progress_bar=cfg.logging.progress_bar,
            wandb_settings=self._wandb_settings(),
            tensorboard=cfg.logging.tensorboard,
        )
        head_flops = head_flops_per_row(self.model_config)
        body_flops = flops_per_token(self.model_config, self.data.tokens_per_sample) - head_flops
        if self.lora_state:  # frozen weights compute no gradient of their own; adapters add theirs
            body_change, head_change = lora.flops_per_token_change(self.engine.module)
            body_flops, head_flops = body_flops + body_change, head_flops + head_change
        peak = peak_tflops(cfg.logging.peak_tflops, self.precision, self.dist.device)
        history = []
        started = time.perf_counter()
        if cfg.trainer.eval_at_start and self.step == 0:  # the held-out curves start at the initial weights
            self._log_eval(logger)
        window = ThroughputWindow(
            tokens_per_step=cfg.trainer.global_batch_size * self.data.tokens_per_sample,
            body_flops=body_flops,
            head_flops=head_flops,
            peak_flops=peak * 1e12 * self.dist.world_size,
        )
        while self.step < cfg.trainer.max_steps:
            metrics = self.train_step()
            window.add_step(self.head_rows_last_step)
            record = {"step": self.step, **metrics}
            if self.step % cfg.trainer.log_every == 0 or self.step == cfg.trainer.max_steps:
                record.update(
                    **window.rates(), epoch=self.plan.epoch_at(self.samples_consumed), **memory_gb(self.dist.device)
                )
                logger.log(record, advance=window.steps)
                window.reset()
            if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 and self.step < cfg.trainer.max_steps:
                with window.paused():
                    record.update(self._log_eval(logger))
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.trainer.max_steps:
                with window.paused():
                    self.checkpoints.save(self.engine, self.step, self._client_state())
            history.append(record)
        if history:
            history[-1].update(self._log_eval(logger))
        if cfg.checkpoint.save_final and (not history or self.checkpoints.latest() != self._final_dir()):
            self.checkpoints.save(self.engine, self.step, self._client_state())
        logger.close()
        if self.dist.is_main:
            self._print_summary(history, time.perf_counter() - started)
        barrier()
        return history

    def _print_summary(self, history: list[dict], seconds: float) -> None:
        losses = [r["loss"] for r in history if "loss" in r]
        evals = [r["eval_loss"] for r in history if "eval_loss" in r]
        parts = [f"[moss-train] done: {len(history)} steps in {seconds:.1f}s"]
        if losses:
            parts.append(f"loss {losses[0]:.4f} (step {history[0]['step']}) -> {losses[-1]:.4f} (step {self.step})")
        if evals:
            parts.append(f"eval_loss {evals[-1]:.4f}")
        latest = self.checkpoints.latest()
        if latest is not None:
            parts.append(f"checkpoint {latest}")
        print("; ".join(parts), flush=True)

    def _final_dir(self):
        return self.checkpoints.root / f"step_{self.step:08d}"

    def _log_eval(self, logger: MetricsLogger) -> dict:
        result = self.evaluate()
        if result:
            logger.log({"step": self.step, **result})
        return result

    def _wandb_settings(self) -> dict:
        cfg = self.cfg
        return {
            "mode": cfg.logging.wandb,
            "project": cfg.logging.project,
            "name": cfg.run.name,
            "group": cfg.logging.group,
            "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        }


def _adapter_identity(lora_state: dict | None):
    """What a LoRA checkpoint must share with the run resuming it: the settings and the base's
    weights (by fingerprint; the base may have moved)."""
    if not lora_state:
        return None
    return {**{k: v for k, v in lora_state.items() if k != "base"}, "base": lora_state["base"]["fingerprint"]}


def run_job(cfg: MossTrainConfig, stage: JobStage, dist_info: DistInfo | None = None) -> list[dict]:
    """Run a stage that trains nothing (engine/stage.py: JobStage): the same set-up as training
    (ranks, CPU threads, the tokenizer, the frozen models it declared under the run's ZeRO
    config), then its run(ctx), which every rank calls together."""
    dist_info = dist_info or init_distributed(cfg.cluster.collective_timeout_s)
    setup.tune_cpu(cfg, dist_info)
    precision = setup.resolve_precision(cfg.trainer.precision, dist_info.device)
    ds_config = setup.deepspeed_config(cfg, precision, dist_info.world_size)
    setup.tune_cpu_attention(cfg, precision, dist_info)
    ctx = StageContext(cfg, stage.load_tokenizer(cfg), dist_info)
    frozen = setup.frozen_models(stage.frozen_models(ctx), cfg, ctx.tokenizer, dist_info, ds_config)
    history = stage.run(replace(ctx, frozen=frozen))
    barrier()
    return history


def train(cfg: MossTrainConfig, stage: Stage) -> list[dict]:
    """Run `stage` as the recipe says, by its declared kind: a training stage through the
    Trainer, a job (tag: it only runs a frozen model) through run_job. Returns the per-step
    metric records (rank 0's view; none for a job)."""
    if stage.kind == JOB:
        return run_job(cfg, stage)
    return Trainer(cfg, stage).fit()
