"""Start any stage from existing weights: `stage.init_from` (moss-train, HF CodeGen or MOSS).

The training loop makes two calls, both no-ops without ``stage.init_from``:

1. :func:`adopt_model_config` before the model is built: the checkpoint's architecture
   replaces the recipe's shapes (n_embd, n_layer, n_head, rotary_dim, n_inner, n_positions,
   activation, LayerNorm epsilon, vocabulary). Training settings stay the recipe's
   (gradient checkpointing, dropouts). Every recipe shape that differs is printed, one line,
   as ``model.KEY recipe -> checkpoint``; it is a notice, not an error, because the default
   recipe always names some model group. What cannot work is an error naming the key:
   ``data.seq_len`` longer than the checkpoint's ``n_positions``.
2. :func:`load_initial_weights` after the model is built and before ``deepspeed.initialize``.

Why per-parameter ``GatheredParameters`` under ZeRO-3: the model is built inside
``deepspeed.zero.Init``, so every parameter is already partitioned over the ranks. For each
parameter in turn, all ranks gather it (one full tensor at a time, never the whole model),
rank 0 alone reads the tensor from the source and copies it in, and on leaving the context
DeepSpeed broadcasts rank 0's values and re-partitions. Only rank 0 opens the source: a 16B
checkpoint is read once per job, not once per GPU, and peak memory is the largest single
tensor (the embedding). Without ZeRO-3 each rank holds the whole model anyway and reads its
own copy (memory-mapped, so ranks of a node share the page cache).

Vocabulary growth: when the run's tokenizer has more ids than the checkpoint has embedding
rows, or added tokens past the end of the checkpoint's own tokenizer (e.g. MOSS special
tokens added to a CodeGen vocabulary, landing in its padding rows), those rows of
``transformer.wte``, ``lm_head.weight`` and ``lm_head.bias`` start at the mean of the
checkpoint's rows. A run tokenizer that gives other tokens at the checkpoint's ids is a recipe
error (``data.tokenizer``) unless ``stage.allow_different_vocab`` is set; where the checkpoint
carries no tokenizer that can be read, only the sizes are compared (a notice says so).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from moss_train.checkpoint.sources import log, open_source, run_tokenizer_pieces, weights_fingerprint
from moss_train.checkpoint.store import CheckpointError
from moss_train.distributed import DistInfo, broadcast_object
from moss_train.errors import ConfigError
from moss_train.model.config import SHAPE_FIELDS, ModelConfig, model_vocab_size
from moss_train.tokenizer import sp_piece

VOCAB_PARAMS = ("transformer.wte.weight", "lm_head.weight", "lm_head.bias")


def adopt_model_config(cfg, tokenizer, dist: DistInfo):
    """The recipe with the checkpoint's architecture (unchanged without stage.init_from)."""
    if not cfg.stage.init_from:
        return cfg
    source = open_source(cfg.stage.init_from)
    model = imported_model_config(cfg.model, source.model_config, tokenizer.vocab_size)
    if dist.is_main:
        report_replaced_shapes(cfg.model, model, source)
    if cfg.data.seq_len > model.n_positions:
        raise ConfigError(
            "data.seq_len",
            f"{cfg.data.seq_len} is longer than n_positions ({model.n_positions}) of {cfg.stage.init_from}",
        )
    return replace(cfg, model=model)


def imported_model_config(recipe: ModelConfig, imported: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Recipe settings with the checkpoint's shapes; the vocabulary grows to the tokenizer's."""
    shapes = {f: getattr(imported, f) for f in SHAPE_FIELDS}
    if tokenizer_vocab > model_vocab_size(imported):
        shapes["vocab_size"] = tokenizer_vocab  # padded by the checkpoint's multiple
    return replace(recipe, **shapes)


def report_replaced_shapes(recipe: ModelConfig, model: ModelConfig, source) -> None:
    changed = [
        f"model.{f} {getattr(recipe, f)} -> {getattr(model, f)}"
        for f in SHAPE_FIELDS
        if getattr(recipe, f) != getattr(model, f) and not (f == "vocab_size" and recipe.vocab_size == 0)
    ]
    summary = "; ".join(changed) if changed else "the recipe's shapes already match"
    log(f"init_from {source.path} ({source.kind}): model shapes from the checkpoint: {summary}")


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadPlan:
    """What rank 0 decided before any tensor moves (so no rank fails half-way through)."""

    names: list[str]  # model parameters to copy from the source
    fresh_rows: list[int]  # vocabulary rows to initialise with the mean embedding
    mean_of_rows: int  # the mean is over the checkpoint's first rows (its real tokens)
    base: dict  # which weights these are: {"path": resolved source, "fingerprint": weights_fingerprint}


def load_initial_weights(model: torch.nn.Module, cfg, tokenizer, dist: DistInfo) -> Optional[LoadPlan]:
    """Copy stage.init_from's weights into the freshly built model (see the module docstring);
    the plan that was followed (None without stage.init_from)."""
    if not cfg.stage.init_from:
        return None
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    reads = dist.is_main or not zero3
    source = open_source(cfg.stage.init_from) if reads and not dist.is_main else None
    plan, error = None, None
    if dist.is_main:
        try:
            source = open_source(cfg.stage.init_from)
            source.verify()  # checksums of a moss-train checkpoint, before any weight is trusted
            plan = plan_load(model, source, tokenizer, cfg.stage.trust_remote_code, cfg.stage.allow_different_vocab)
        except ConfigError as exc:  # a recipe error: every rank raises it, naming the key
            error = exc
        except Exception as exc:  # every rank must learn of it, or the others wait forever
            error = (
                str(exc) if isinstance(exc, CheckpointError) else f"{cfg.stage.init_from}: {type(exc).__name__}: {exc}"
            )
    plan, error = broadcast_object((plan, error))
    if isinstance(error, ConfigError):
        raise error
    if error:
        raise CheckpointError(error)
    params = dict(model.named_parameters())
    for name in plan.names:
        param = params[name]
        with _gathered(param, zero3):
            if reads:
                with torch.no_grad():
                    param.data.copy_(_fit(source.tensor(name), param, name, plan))
    if dist.is_main:
        grown = f"; {len(plan.fresh_rows)} vocabulary rows start at the mean embedding" if plan.fresh_rows else ""
        log(f"loaded {len(plan.names)} tensors from {cfg.stage.init_from}{grown}")
    return plan


def _gathered(param, zero3: bool):
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def _full_shape(param) -> tuple:
    return tuple(getattr(param, "ds_shape", param.shape))


def plan_load(model, source, tokenizer, trust_remote_code: bool, allow_different_vocab: bool = False) -> LoadPlan:
    """Match names and shapes, decide the fresh vocabulary rows; CheckpointError on a mismatch."""
    expected = {name: _full_shape(p) for name, p in model.named_parameters()}
    available = set(source.names)
    fresh_prefixes = tuple(getattr(model, "fresh_init_prefixes", ()))
    missing = [n for n in expected if n not in available and not n.startswith(fresh_prefixes)]
    if missing:
        raise CheckpointError(f"{source.path} lacks {len(missing)} parameters of the model: {', '.join(missing[:8])}")
    source_rows = source.shape("transformer.wte.weight")[0]
    wrong = []
    for name in (n for n in expected if n in available):
        have, want = source.shape(name), expected[name]
        if name in VOCAB_PARAMS:
            have, want = have[1:], want[1:]  # rows may grow
        if tuple(have) != tuple(want):
            wrong.append(f"{name} {tuple(source.shape(name))} vs the model's {expected[name]}")
    if wrong:
        raise CheckpointError(f"{source.path}: shapes differ from the model: {'; '.join(wrong[:8])}")
    unused = sorted(available - set(expected))
    if unused:
        log(
            f"{len(unused)} tensors of {source.path} are not part of this model and stay unused: "
            f"{', '.join(unused[:4])}"
        )
    fresh = [n for n in expected if n not in available]
    if fresh:
        log(f"{len(fresh)} parameters start freshly initialised (not in the checkpoint): {', '.join(fresh)}")
    model_rows = expected["transformer.wte.weight"][0]
    pieces = source.tokenizer_pieces(trust_remote_code)
    fresh_rows = fresh_vocab_rows(tokenizer, pieces, source_rows, model_rows, allow_different_vocab)
    mean_of_rows = min(source_rows, len(pieces)) if pieces else source_rows
    base = {"path": str(Path(source.path).resolve()), "fingerprint": weights_fingerprint(source)}
    return LoadPlan([n for n in expected if n in available], fresh_rows, mean_of_rows, base)


def fresh_vocab_rows(
    tokenizer,
    source_pieces: Optional[list[str]],
    source_rows: int,
    model_rows: int,
    allow_different_vocab: bool = False,
) -> list[int]:
    """Rows to start at the mean embedding: every row past the checkpoint's, and the run
    tokenizer's ids past the end of the checkpoint's own tokenizer (its added tokens).

    Where both tokenizers have an id, their pieces must agree: otherwise the checkpoint's
    embeddings belong to other tokens, a ConfigError unless `allow_different_vocab`.
    """
    fresh = set(range(source_rows, model_rows))
    if source_pieces is not None:
        ours = run_tokenizer_pieces(tokenizer)
        theirs = [sp_piece(p) for p in source_pieces]
        common = min(len(ours), len(theirs))
        differ = [i for i in range(common) if ours[i] != theirs[i]]
        if differ:
            i = differ[0]
            problem = (
                f"the run's tokenizer and the checkpoint's differ at {len(differ)} of {common} ids "
                f"(first: id {i} {ours[i]!r} vs {theirs[i]!r}); those embeddings belong to other tokens"
            )
            if not allow_different_vocab:
                raise ConfigError(
                    "data.tokenizer",
                    f"{problem}: use the checkpoint's tokenizer (or one that only adds tokens at the end), "
                    "or set stage.allow_different_vocab=true",
                )
            log(f"WARNING: {problem} (stage.allow_different_vocab)")
        if len(ours) > len(theirs):
            log(f"{len(ours) - len(theirs)} tokens added to the checkpoint's tokenizer: {ours[len(theirs) :][:10]}")
            fresh.update(range(len(theirs), min(len(ours), model_rows)))
    return sorted(fresh)


def _fit(value: torch.Tensor, param, name: str, plan: LoadPlan) -> torch.Tensor:
    """The source tensor in the parameter's shape and dtype; new vocabulary rows = row mean."""
    value = value.to(param.dtype)
    if name not in VOCAB_PARAMS or (value.shape[0] == param.shape[0] and not plan.fresh_rows):
        return value
    rows = param.shape[0]
    out = torch.empty((rows, *value.shape[1:]), dtype=value.dtype)
    kept = min(rows, value.shape[0])
    out[:kept] = value[:kept]
    out[plan.fresh_rows] = value[: plan.mean_of_rows].float().mean(dim=0).to(value.dtype)
    return out
