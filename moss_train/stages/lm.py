"""Pieces every language-modelling stage shares: tokenizer and model from the recipe, the loss."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from moss_train.errors import ConfigError
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import padded_vocab_size
from moss_train.stages.base import LossTerms
from moss_train.tokenizer import MossTokenizer
from moss_train.tokenizer import load_tokenizer as load_any_tokenizer

IGNORE_INDEX = -100


def load_tokenizer(cfg) -> MossTokenizer:
    path = Path(cfg.data.tokenizer)
    if not path.exists():
        hint = f"; prepare the data with: {cfg.data.prepare_hint}" if cfg.data.prepare_hint else ""
        raise ConfigError("data.tokenizer", f"no tokenizer at {path}{hint}")
    return load_any_tokenizer(path)  # a MOSS tokenizer directory, or any HF tokenizer directory


def resolve_model_config(cfg, tokenizer: MossTokenizer):
    """The model recipe with its vocabulary sized for the tokenizer (vocab_size 0 = from it)."""
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        return replace(model_cfg, vocab_size=padded_vocab_size(tokenizer.vocab_size, model_cfg.pad_vocab_to_multiple_of))
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{model_cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
        )
    return model_cfg


def build_causal_lm(cfg, tokenizer: MossTokenizer) -> CodeGenForCausalLM:
    return CodeGenForCausalLM(resolve_model_config(cfg, tokenizer))


def resolve_shards(root: str, patterns: list[str], key: str, prepare_hint: str = "") -> list[str]:
    """Shard prefixes matching the recipe's patterns (a shard is complete once its .json exists)."""
    prefixes: list[str] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(Path(root) / pattern)
        matches = sorted(m[: -len(".json")] for m in glob.glob(full + ".json"))
        if not matches:
            hint = f"; prepare the data with: {prepare_hint}" if prepare_hint else ""
            raise ConfigError(key, f"no shard matches {full!r}{hint}")
        prefixes.extend(matches)
    return prefixes


# Rows of logits per chunk in token_cross_entropy: ~32 MiB of fp32 (256 rows of a 32k
# vocabulary), enough rows for ATen's softmax kernels to use every thread, while the fp32
# temporaries stay a small fraction of the N x V logits.
CHUNK_BYTES = 2**25


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy and argmax of (N, V) logits, in fp32 whatever the logits' dtype.

    F.cross_entropy keeps its fp32 log-softmax output (N x V) for backward, and nll_loss's
    backward fills another dense N x V gradient before log-softmax's backward makes a third;
    the accuracy metric's argmax reads the logits once more. Here the forward keeps only one
    fp32 log-sum-exp per row (the logits themselves are kept, in their own dtype, not copied),
    finds the argmax chunk by chunk while the chunk is in cache, and the backward computes
    softmax - one-hot chunk by chunk into the one gradient buffer: one N x V buffer fewer at
    the loss's peak.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):
        rows = max(1, CHUNK_BYTES // (4 * logits.shape[1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        predicted = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows].float()
            # ATen's vectorised log-softmax kernel, on a chunk in cache: lse = x - log_softmax(x).
            lse[start : start + rows] = chunk[:, 0] - torch.log_softmax(chunk, dim=-1)[:, 0]
            predicted[start : start + rows] = chunk.argmax(dim=-1)
        valid = labels != IGNORE_INDEX
        target_logits = logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1).float()
        token_loss = torch.where(valid, lse - target_logits, 0.0)
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(predicted)
        return token_loss, predicted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_predicted):
        logits, labels, lse = ctx.saved_tensors
        scale = torch.where(labels != IGNORE_INDEX, grad_loss.float(), 0.0)[:, None]
        targets = labels.clamp(min=0)[:, None]
        grad = torch.empty_like(logits)
        rows = max(1, CHUNK_BYTES // (4 * logits.shape[1]))
        for start in range(0, logits.shape[0], rows):
            stop = start + rows
            probs = torch.softmax(logits[start:stop].float(), dim=-1)
            probs.mul_(scale[start:stop]).scatter_add_(1, targets[start:stop], -scale[start:stop])
            grad[start:stop] = probs
        return grad, None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits, (N,) labels -> per-token fp32 loss (0 where the label is -100) and the
    argmax prediction per token; equal to F.cross_entropy(logits.float(), labels,
    reduction="none") and logits.argmax(-1)."""
    return _TokenCrossEntropy.apply(logits.contiguous(), labels.contiguous())


def causal_lm_loss(model, batch: dict, group_names: Sequence[str] = ()) -> LossTerms:
    """Summed next-token cross-entropy over labels != -100, and the count of those labels.

    With `group_names`, ``batch["source_ids"]`` (per token, an index into `group_names`) adds
    ``loss_<name>``: the loss summed over that group's targets, counted by them (reported as
    the per-source mean over all micro-batches and ranks).
    """
    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
    )
    labels = batch["labels"]
    targets = labels != IGNORE_INDEX
    token_loss, predicted = token_cross_entropy(logits.flatten(0, 1), labels.flatten())
    token_loss, predicted = token_loss.view_as(labels), predicted.view_as(labels)
    sums, counts = {}, {}
    if group_names:
        groups = batch["source_ids"]
        for g, name in enumerate(group_names):
            in_group = targets & (groups == g)
            if in_group.any():
                sums[f"loss_{name}"] = token_loss.detach()[in_group].sum().double()
                counts[f"loss_{name}"] = in_group.sum()
    sums["accuracy"] = ((predicted == labels) & targets).sum().to(torch.float64)
    return LossTerms(loss_sum=token_loss.sum(), num_targets=targets.sum(), sums=sums, counts=counts)


def count_label_targets(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())
