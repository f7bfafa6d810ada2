"""Model configuration: the typed schema a recipe's ``model:`` group fills in, and the
arithmetic on it (validation, HF config conversion, parameter and FLOP counts).

``ModelConfig`` is used directly as a Hydra / OmegaConf structured-config schema, so it holds
plain typed fields only; everything that computes something is a module-level function.
"""

from dataclasses import dataclass
from typing import Any, Optional

from moss_train.errors import ConfigError

# CodeGen's fused qkv projection is laid out for 4 model-parallel partitions (TPU-v4 cores in
# the original JAX code): the output is split in 4 blocks, each holding (q, v, k) for
# n_head/4 heads. The layout is part of the weights, so n_head must be a multiple of 4.
QKV_PARTITIONS = 4


# Architecture fields: what a checkpoint's weights decide (stage.init_from adopts them, a resume
# must match them); the rest of ModelConfig (dropouts, checkpointing) is the recipe's choice.
SHAPE_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "rotary_dim",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "pad_vocab_to_multiple_of",
)


@dataclass
class ModelConfig:
    """A CodeGen-architecture model (the MOSS base). Field names follow HF's ``CodeGenConfig``.

    ``vocab_size`` 0 means "take it from the tokenizer"; the caller resolves it before building
    the model. The built model's embedding and lm_head have
    ``padded_vocab_size(vocab_size, pad_vocab_to_multiple_of)`` rows (extra rows are never
    produced by the tokenizer; padding keeps the matmuls aligned).
    """

    name: str = "custom"
    vocab_size: int = 0
    n_positions: int = 2048
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    rotary_dim: int = 32
    n_inner: Optional[int] = None  # None -> 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    gradient_checkpointing: bool = False
    pad_vocab_to_multiple_of: int = 64


# ----------------------------------------------------------------------------- validation

_POSITIVE_INTS = ("n_embd", "n_layer", "n_head", "n_positions")
_DROPOUTS = ("embd_pdrop", "resid_pdrop", "attn_pdrop")


def validate_model_config(cfg: Any, prefix: str = "model") -> None:
    """Raise ``ConfigError`` naming the offending key if ``cfg`` cannot describe a model.

    Which key each rule blames:
      - n_embd / n_layer / n_head / n_positions <= 0           -> that key
      - vocab_size < 0 (0 is allowed: resolved from tokenizer) -> vocab_size
      - n_embd not divisible by n_head                         -> n_head
        (the head count is what one picks to divide the width)
      - n_head not a multiple of 4 (fused qkv layout)          -> n_head
      - rotary_dim <= 0, odd, or > head_dim (n_embd // n_head) -> rotary_dim
      - n_inner set and <= 0                                   -> n_inner
      - activation_function not in transformers' ACT2FN        -> activation_function
      - a dropout outside [0, 1)                               -> that dropout key
      - layer_norm_epsilon <= 0, initializer_range < 0,
        pad_vocab_to_multiple_of < 1                           -> that key
      - a value of the wrong type                              -> that key

    ``cfg`` may be a ``ModelConfig`` or anything with the same attributes (e.g. a DictConfig).
    """

    def err(field: str, message: str) -> ConfigError:
        return ConfigError(f"{prefix}.{field}", message)

    def get(field: str) -> Any:
        return getattr(cfg, field)

    # Types first, so the arithmetic below cannot fail with a TypeError.
    int_fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "pad_vocab_to_multiple_of")
    for f in int_fields:
        v = get(f)
        if not isinstance(v, int) or isinstance(v, bool):
            raise err(f, f"must be an integer, got {v!r} ({type(v).__name__})")
    n_inner = get("n_inner")
    if n_inner is not None and (not isinstance(n_inner, int) or isinstance(n_inner, bool)):
        raise err("n_inner", f"must be an integer or null, got {n_inner!r}")
    for f in ("layer_norm_epsilon", "initializer_range") + _DROPOUTS:
        v = get(f)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise err(f, f"must be a number, got {v!r} ({type(v).__name__})")

    for f in _POSITIVE_INTS:
        if get(f) <= 0:
            raise err(f, f"must be positive, got {get(f)}")
    if get("vocab_size") < 0:
        raise err("vocab_size", f"must be >= 0 (0 = take it from the tokenizer), got {get('vocab_size')}")

    n_embd, n_head, rotary_dim = get("n_embd"), get("n_head"), get("rotary_dim")
    if n_embd % n_head != 0:
        raise err("n_head", f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if n_head % QKV_PARTITIONS != 0:
        raise err(
            "n_head",
            f"n_head ({n_head}) must be a multiple of {QKV_PARTITIONS} "
            f"(CodeGen's fused qkv_proj is split in {QKV_PARTITIONS} partitions)",
        )
    head_dim = n_embd // n_head
    if rotary_dim <= 0:
        raise err("rotary_dim", f"must be positive, got {rotary_dim}")
    if rotary_dim % 2 != 0:
        raise err("rotary_dim", f"must be even (rotary rotates pairs of dims), got {rotary_dim}")
    if rotary_dim > head_dim:
        raise err(
            "rotary_dim",
            f"rotary_dim ({rotary_dim}) must be <= head_dim = n_embd // n_head = {n_embd} // {n_head} = {head_dim}",
        )

    if n_inner is not None and n_inner <= 0:
        raise err("n_inner", f"must be positive or null (null = 4 * n_embd), got {n_inner}")

    from transformers.activations import ACT2FN

    act = get("activation_function")
    if act not in ACT2FN:
        raise err("activation_function", f"unknown activation {act!r}; known: {', '.join(sorted(ACT2FN))}")

    for f in _DROPOUTS:
        p = get(f)
        if not 0.0 <= p < 1.0:
            raise err(f, f"dropout probability must be in [0, 1), got {p}")
    if get("layer_norm_epsilon") <= 0:
        raise err("layer_norm_epsilon", f"must be positive, got {get('layer_norm_epsilon')}")
    if get("initializer_range") < 0:
        raise err("initializer_range", f"must be >= 0, got {get('initializer_range')}")
    if get("pad_vocab_to_multiple_of") < 1:
        raise err("pad_vocab_to_multiple_of", f"must be >= 1 (1 = no padding), got {get('pad_vocab_to_multiple_of')}")


# ----------------------------------------------------------------------------- sizes


def padded_vocab_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (``multiple`` <= 1: no padding)."""
    if multiple <= 1:
        return n
    return ((n + multiple - 1) // multiple) * multiple


def model_vocab_size(cfg: ModelConfig) -> int:
    """Rows of the built model's embedding and lm_head: the padded vocabulary size."""
    return padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)


def inner_dim(cfg: ModelConfig) -> int:
    """Width of the MLP's hidden layer."""
    return cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd


def num_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of ``CodeGenForCausalLM(cfg)``, without building it."""
    V, C, L, inner = model_vocab_size(cfg), cfg.n_embd, cfg.n_layer, inner_dim(cfg)
    per_layer = (
        2 * C  # ln_1 weight + bias
        + 3 * C * C  # attn.qkv_proj (no bias)
        + C * C  # attn.out_proj (no bias)
        + C * inner
        + inner  # mlp.fc_in
        + inner * C
        + C  # mlp.fc_out
    )
    return (
        V * C  # transformer.wte
        + L * per_layer
        + 2 * C  # transformer.ln_f
        + V * C
        + V  # lm_head (untied, with bias)
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's formula (Chowdhery et al. 2022, B):

        6 * N + 12 * n_layer * n_embd * seq_len

    where N = every parameter that takes part in a matmul, i.e. ``num_parameters(cfg)`` minus
    the input embedding table (a lookup, no FLOPs) -- the untied lm_head *is* counted. The
    second term is the attention score and value matmuls (QK^T and AV: 2 matmuls x 2 FLOPs/MAC
    x 3 for fwd+bwd over seq_len keys of width n_embd), counted over the full (non-causal)
    context as PaLM does. Activation recomputation (gradient checkpointing) is not counted: this
    is "model FLOPs", the numerator of MFU.
    """
    n_matmul = num_parameters(cfg) - model_vocab_size(cfg) * cfg.n_embd
    return float(6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * seq_len)


def head_flops_per_row(cfg: ModelConfig) -> float:
    """The lm_head's share of flops_per_token: 6 x its parameters (weight and bias, padded
    vocabulary). The head runs only at the positions a loss needs logits for (model/codegen.py:
    logits_at; SFT's answer tokens, none for the reward model's scalar head), so a training
    run's MFU counts it per such position, not per token (engine/loop.py)."""
    vocab = model_vocab_size(cfg)
    return float(6 * (vocab * cfg.n_embd + vocab))


# ----------------------------------------------------------------------------- HF conversion


def to_hf_config(cfg: ModelConfig):
    """The ``transformers.CodeGenConfig`` of the same model.

    ``vocab_size`` becomes the padded size, so the HF model has exactly our weights' shapes.
    bos/eos token ids are left ``None`` for the caller (who knows the tokenizer) to set.
    """
    from transformers import CodeGenConfig

    validate_model_config(cfg)
    if cfg.vocab_size <= 0:
        raise ConfigError("model.vocab_size", "must be resolved from the tokenizer (> 0) before converting to HF")
    return CodeGenConfig(
        vocab_size=model_vocab_size(cfg),
        n_positions=cfg.n_positions,
        n_ctx=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        rotary_dim=cfg.rotary_dim,
        n_inner=cfg.n_inner,
        activation_function=cfg.activation_function,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        initializer_range=cfg.initializer_range,
        resid_pdrop=cfg.resid_pdrop,
        embd_pdrop=cfg.embd_pdrop,
        attn_pdrop=cfg.attn_pdrop,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )


def from_hf_config(hf_cfg: Any, **overrides: Any) -> ModelConfig:
    """A ``ModelConfig`` from an HF ``CodeGenConfig`` (or MOSS's, which has the same fields).

    The vocabulary is taken exactly as the checkpoint has it: ``pad_vocab_to_multiple_of`` keeps
    its default (64) when the HF vocab is already a multiple of it and becomes 1 otherwise, so
    the built model always has the checkpoint's shapes. Fields HF does not carry (``name``,
    ``gradient_checkpointing``) get their defaults unless given in ``overrides``.
    ``from_hf_config(to_hf_config(cfg)) == cfg`` for every valid cfg whose vocab is already
    padded and whose name/gradient_checkpointing are the defaults.
    """
    if getattr(hf_cfg, "tie_word_embeddings", False):
        raise ConfigError("model", "HF config has tie_word_embeddings=True; CodeGen/MOSS use an untied lm_head")
    if getattr(hf_cfg, "rotary_dim", None) is None:
        raise ConfigError("model.rotary_dim", "HF config has rotary_dim=None, which CodeGen does not support")
    default_multiple = ModelConfig.pad_vocab_to_multiple_of
    vocab = int(hf_cfg.vocab_size)
    fields = dict(
        vocab_size=vocab,
        n_positions=int(hf_cfg.n_positions),
        n_embd=int(hf_cfg.n_embd),
        n_layer=int(hf_cfg.n_layer),
        n_head=int(hf_cfg.n_head),
        rotary_dim=int(hf_cfg.rotary_dim),
        n_inner=None if hf_cfg.n_inner is None else int(hf_cfg.n_inner),
        activation_function=str(hf_cfg.activation_function),
        layer_norm_epsilon=float(hf_cfg.layer_norm_epsilon),
        initializer_range=float(getattr(hf_cfg, "initializer_range", ModelConfig.initializer_range)),
        embd_pdrop=float(hf_cfg.embd_pdrop),
        resid_pdrop=float(hf_cfg.resid_pdrop),
        attn_pdrop=float(hf_cfg.attn_pdrop),
        pad_vocab_to_multiple_of=default_multiple if vocab % default_multiple == 0 else 1,
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    validate_model_config(cfg)
    return cfg
