"""The CodeGen / MOSS transformer, readable top to bottom.

Same math and the same parameter names as ``transformers``' ``CodeGenForCausalLM`` (and the
MOSS checkpoints), so state dicts move in and out without conversion:

    transformer.wte.weight
    transformer.h.{i}.ln_1.{weight,bias}
    transformer.h.{i}.attn.qkv_proj.weight        fused q/v/k, no bias, 4-partition layout
    transformer.h.{i}.attn.out_proj.weight        no bias
    transformer.h.{i}.mlp.fc_in.{weight,bias}
    transformer.h.{i}.mlp.fc_out.{weight,bias}
    transformer.ln_f.{weight,bias}
    lm_head.{weight,bias}                         untied from wte

Differences from the HF implementation are in *how*, not *what*: rotary sin/cos are computed
on the fly from the position ids (no buffers at all, the state dict is only parameters);
attention goes through ``scaled_dot_product_attention``; packed sequences are supported with
``segment_ids`` (a block-diagonal causal mask); for generation, an optional KV cache
(``cache=``, :class:`moss_train.chat.generate.KVCache`) that training never passes.

Weights are initialised inside each leaf module's constructor (``reset_parameters``), never by
a later ``model.apply``: under DeepSpeed's ``zero.Init`` a module's parameters are partitioned
as soon as its own ``__init__`` returns, so a later pass would see empty tensors.
"""

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Imported here, not lazily in a constructor: importing transformers pulls in torch._dynamo, and
# a first import of that inside deepspeed.zero.Init (which patches tensor constructors) fails.
from transformers.activations import ACT2FN

from moss_train.errors import ConfigError
from moss_train.model.config import (
    QKV_PARTITIONS,
    ModelConfig,
    inner_dim,
    model_vocab_size,
    validate_model_config,
)

# ----------------------------------------------------------------------------- leaf modules


class _Linear(nn.Linear):
    """nn.Linear initialised like HF's CodeGen: weight ~ N(0, std), bias = 0."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float):
        self.init_std = std  # read by reset_parameters(), which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _Embedding(nn.Embedding):
    """nn.Embedding initialised with weight ~ N(0, std)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float):
        self.init_std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


def _activation(name: str) -> nn.Module:
    # "gelu_new" is the tanh approximation of GELU: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))).
    # PyTorch's fused kernel computes the same formula in one pass instead of ~8 elementwise ops.
    if name == "gelu_new":
        name = "gelu_pytorch_tanh"
    return ACT2FN[name]


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped where it is the identity (p = 0, the recipes' default, or eval): not an
    nn.Dropout module, whose call costs as much as a small operator in every decoding step."""
    return F.dropout(x, p, training) if training and p > 0 else x


# ----------------------------------------------------------------------------- rotary + masks


@functools.cache
def _inverse_frequencies(rotary_dim: int, device: torch.device) -> torch.Tensor:
    """GPT-J / CodeGen's 1 / 10000^(2i / rotary_dim), fp32: made once per device, not in every
    forward (at batch 1 a decoding step is mostly small operators; these five were 8% of it)."""
    with torch.inference_mode(False):  # a normal tensor, also where generation made it first
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
        return 1.0 / (10000**exponent)


def rotary_angles(position_ids: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """(B, T) positions -> (B, T, rotary_dim/2) angles in fp32, GPT-J / CodeGen frequencies."""
    return position_ids.float()[..., None] * _inverse_frequencies(rotary_dim, position_ids.device)


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions -> the (signed sin, cos) tables of apply_rotary, fp32, shaped to broadcast
    against the fused projection's q / k slots: (B, T, 1, 1, 1, rotary_dim/2, 2) and (..., 1).
    Computed once per forward; every layer reads them."""
    angles = rotary_angles(position_ids, rotary_dim)[:, :, None, None, None, :]
    sin = angles.sin()
    return torch.stack((-sin, sin), dim=-1), angles.cos()[..., None]


def apply_rotary(x: torch.Tensor, signed_sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of the last axis of ``x``, GPT-J style: consecutive
    pairs (x0, x1), (x2, x3), ... are rotated by their angle ("rotate every two"); the rest of
    ``x`` passes through. The tables come from :func:`rotary_tables`.

    Each pair becomes (x0 cos - x1 sin, x1 cos + x0 sin), computed as pair * cos + swapped pair *
    (-sin, sin): the same products and sums, bit for bit, in half the operators of rotating x0
    and x1 apart."""
    rot = 2 * signed_sin.shape[-2]
    pairs = x[..., :rot].unflatten(-1, (-1, 2))
    if cos.dtype != x.dtype:  # a cast to the same dtype is a no-op, but still two operator calls per layer
        cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    rotated = (pairs * cos + pairs.flip(-1) * signed_sin).flatten(-2)
    return torch.cat((rotated, x[..., rot:]), dim=-1) if rot < x.shape[-1] else rotated


# Above this many documents in a micro-batch, one masked attention call beats a call per document.
MAX_DOCUMENT_CALLS = 256


def document_spans(segment_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(B, T) document index per token -> per row, the [start, end) of each document, in order.
    Documents are contiguous runs of one index (as the packers write them)."""
    B, T = segment_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    rows = []
    for row in starts.cpu():  # one host sync per forward, not per layer
        bounds = row.nonzero().flatten().tolist() + [T]
        rows.append(list(zip(bounds[:-1], bounds[1:])))
    return rows


def document_attention_layout(segment_ids: Optional[torch.Tensor]):
    """How attention keeps to documents: None (one document per row: plain causal), per-row
    document spans (each document its own causal attention call: its cost is the sum of the
    squared document lengths, not the squared row length, and it stays on SDPA's fused causal
    kernels), or, for many short documents, one block-diagonal causal mask."""
    if segment_ids is None:
        return None
    spans = document_spans(segment_ids)
    if sum(len(row) for row in spans) <= MAX_DOCUMENT_CALLS:
        return spans
    return document_causal_mask(segment_ids)


# bf16 causal attention on a CPU shorter than this many tokens runs in fp32: SDPA's CPU kernel can be
# slower in bf16 at short lengths (an AMD EPYC: 2x at 170 tokens, even at 512, faster from 1024).
# The engine sets it per machine from a measurement (engine/cpu.py); 0 leaves every call as it is.
_bf16_cpu_attention_in_fp32_below = 0


def attend_in_fp32_below(length: int) -> None:
    global _bf16_cpu_attention_in_fp32_below
    _bf16_cpu_attention_in_fp32_below = length


# SDPA's CPU backward in bf16 builds and keeps kernels for every sequence length it meets, about
# 8 MB each, for the life of the process (torch 2.13; fp32 keeps none), and building them makes a
# new length's step 3x slower. Per-document attention meets every document length: the quickstart's
# SFT grew to 10 GB. So training pads a bf16 document on the right to a multiple of this many tokens:
# under the causal mask no real query sees the padding, and the padded rows' outputs are dropped, so
# real positions get the same attention (up to bf16 rounding, which follows the kernel's blocking).
BF16_CPU_ATTENTION_LENGTH_STEP = 64


def _causal_sdpa(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[2] < _bf16_cpu_attention_in_fp32_below:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True, scale=scale
            )
        return out.to(q.dtype)

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)

    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        return with_rows_padded(causal, (q, k, v), BF16_CPU_ATTENTION_LENGTH_STEP)
    return causal(q, k, v)


def with_rows_padded(fn, tensors: tuple, step: int) -> torch.Tensor:
    """fn(*tensors) with the rows (dim -2) of each tensor zero-padded at the end to a multiple of
    `step`, and the padded rows dropped from its output's dim -2: a kernel that keeps state per
    shape then meets only whole steps."""
    rows = tensors[0].shape[-2]
    padding = -rows % step
    if not padding:
        return fn(*tensors)
    return fn(*(F.pad(t, (0, 0, 0, padding)) for t in tensors))[..., :rows, :]


def _one_query_attention(q, k, v, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """A generation step: one query per row and head, (B, H, 1, D), seeing every cached key of
    its row (mask: (B, 1, 1, L) bool, or None for all). Two batched matrix products over the
    B * H heads: on a CPU SDPA's flash kernel takes 0.20 ms where these take 0.16 (32 rows x 4
    heads x 128 keys x 32 dims, 1 thread, an AVX2 AMD EPYC), and a decoding step calls it once
    per layer. The cache's (B, H, L, D) slices merge B and H without a copy."""
    B, H, _, D = q.shape
    scores = torch.bmm(q.reshape(B * H, 1, D) * scale, k.flatten(0, 1).transpose(1, 2))
    if mask is not None:
        scores = scores.view(B, H, 1, -1).masked_fill(~mask, float("-inf")).view(B * H, 1, -1)
    return torch.bmm(scores.softmax(dim=-1), v.flatten(0, 1)).view(B, H, 1, D)


def attend(q, k, v, layout, dropout_p: float, scale: float) -> torch.Tensor:
    """Causal attention of (B, H, T, D) q/k/v under a layout from document_attention_layout (or
    KVCache.attention_mask: None there means plain causal, keys and queries ending together)."""
    if layout is None and q.shape[2] > 1:
        return _causal_sdpa(q, k, v, dropout_p, scale)
    if not isinstance(layout, list):
        # A mask, or one query (a generation step over a KV cache): it sees every key.
        if q.shape[2] == 1 and dropout_p == 0.0:
            return _one_query_attention(q, k, v, layout, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=layout, dropout_p=dropout_p, scale=scale)
    rows = []
    # split(), not indexing: its backward is one concatenation, not a zero-filled full-size
    # gradient per slice.
    for spans, *qkv in zip(layout, q.split(1), k.split(1), v.split(1)):
        lengths = [e - s for s, e in spans]
        parts = [
            _causal_sdpa(qd, kd, vd, dropout_p, scale) for qd, kd, vd in zip(*(t.split(lengths, dim=2) for t in qkv))
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0)


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index per token -> (B, 1, T, T) bool, True where attention is allowed:
    token i sees token j iff j <= i and both belong to the same document."""
    T = segment_ids.shape[-1]
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same_doc & causal)[:, None]


# ----------------------------------------------------------------------------- the blocks


class CodeGenAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.attn_pdrop = cfg.attn_pdrop
        std = cfg.initializer_range
        self.qkv_proj = _Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False, std=std)
        self.out_proj = _Linear(cfg.n_embd, cfg.n_embd, bias=False, std=std)
        self.resid_pdrop = cfg.resid_pdrop

    def forward(self, x, signed_sin, cos, layout, kv=None) -> torch.Tensor:
        B, T, C = x.shape
        H, D, P = self.n_head, self.head_dim, QKV_PARTITIONS
        # Fused projection in CodeGen's layout: P partitions, each [q | v | k] for H/P heads.
        qkv = self.qkv_proj(x).view(B, T, P, 3, H // P, D)  # note the order q, v, k
        # q and k (slots 0 and 2) rotated in one pass: half the small ops of two calls.
        q, k = apply_rotary(qkv[:, :, :, ::2], signed_sin, cos).unbind(3)  # (B, T, P, H/P, D) each
        v = qkv[:, :, :, 1]
        # Heads are numbered partition-major (head = p * H/P + j), as HF's _split_heads does.
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if kv is not None:  # generation: also attend to the cached keys / values of earlier tokens
            k, v = kv.update(k, v)
        y = attend(q, k, v, layout, self.attn_pdrop if self.training else 0.0, 1.0 / math.sqrt(D))
        y = y.transpose(1, 2).reshape(B, T, C)
        return _dropout(self.out_proj(y), self.resid_pdrop, self.training)


class CodeGenMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        std = cfg.initializer_range
        self.fc_in = _Linear(cfg.n_embd, inner_dim(cfg), bias=True, std=std)
        self.act = _activation(cfg.activation_function)
        self.fc_out = _Linear(inner_dim(cfg), cfg.n_embd, bias=True, std=std)
        self.resid_pdrop = cfg.resid_pdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.fc_out(self.act(self.fc_in(x))), self.resid_pdrop, self.training)


class CodeGenBlock(nn.Module):
    """One LayerNorm feeding attention and MLP in parallel: x + attn(ln(x)) + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CodeGenAttention(cfg)
        self.mlp = CodeGenMLP(cfg)

    def forward(self, x, signed_sin, cos, layout, kv=None):
        h = self.ln_1(x)
        return self.attn(h, signed_sin, cos, layout, kv) + self.mlp(h) + x  # HF's summation order


# ----------------------------------------------------------------------------- the model


class CodeGenForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size", "must be resolved from the tokenizer (> 0) before building the model")
        self.config = cfg
        self.rotary_dim = cfg.rotary_dim
        vocab, std = model_vocab_size(cfg), cfg.initializer_range
        self.transformer = nn.ModuleDict(
            dict(
                wte=_Embedding(vocab, cfg.n_embd, std=std),
                h=nn.ModuleList(CodeGenBlock(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
            )
        )
        self.lm_head = _Linear(cfg.n_embd, vocab, bias=True, std=std)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        cache=None,
    ) -> torch.Tensor:
        """Final (post ln_f) hidden states, (B, T, n_embd), in the compute dtype.

        position_ids: (B, T) or (T,); default 0..T-1. For packed sequences they restart at 0
            in each document.
        segment_ids: (B, T) document index per token; when given, attention stays inside each
            document (see document_attention_layout); when None, plain causal attention.
        cache: generation only (eval mode): the new tokens' keys / values are appended to it and
            they attend to every cached token of their own segment; pass their position_ids.
        """
        B, T = input_ids.shape
        if position_ids is None:
            if T > self.config.n_positions:
                raise ValueError(f"sequence length {T} exceeds n_positions {self.config.n_positions}")
            position_ids = torch.arange(T, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        signed_sin, cos = rotary_tables(position_ids, self.rotary_dim)  # fp32; cast to q's dtype in apply_rotary
        # With a cache, its mask lets the new tokens see the cached ones (same segment, causal).
        layout = document_attention_layout(segment_ids) if cache is None else cache.attention_mask(segment_ids)

        x = _dropout(self.transformer.wte(input_ids), self.config.embd_pdrop, self.training)
        for i, block in enumerate(self.transformer.h):
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, signed_sin, cos, layout, use_reentrant=False)
            else:
                x = block(x, signed_sin, cos, layout, None if cache is None else cache.layers[i])
        return self.transformer.ln_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        cache=None,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, T, padded vocab) in the compute dtype.

        logits_at: (B, T) bool; when given, only the logits of those positions, (N, padded
            vocab) in row-major order. A loss needs logits only where it has targets (in SFT
            about a third of the tokens), and the vocabulary projection is most of a small
            model's FLOPs, so the rest are not computed.
        """
        hidden = self.hidden_states(input_ids, position_ids, segment_ids, cache)
        if logits_at is None:
            return self.lm_head(hidden)
        hidden = hidden[logits_at]
        if torch.is_grad_enabled() and _bf16_matmuls_on_cpu(hidden):
            return with_rows_padded(self.lm_head, (hidden,), BF16_CPU_HEAD_ROWS_STEP)
        return self.lm_head(hidden)


# oneDNN, which runs bf16 matmuls on a CPU, builds and caches a kernel for every row count it meets
# (the head's forward and both backward products; with their buffers, megabytes each, up to 1024 kept).
# The logits of the target positions only have a new row count nearly every batch: the quickstart's SFT
# grew to 10 GB. Training pads the rows to a multiple of this, which bounds the counts; the extra rows'
# logits are dropped, and their zero gradient adds nothing to the head's. Inference (a generation's
# prefill: one row per sequence) computes its rows as they are.
BF16_CPU_HEAD_ROWS_STEP = 256


def _bf16_matmuls_on_cpu(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def column_major_head(model: CodeGenForCausalLM) -> CodeGenForCausalLM:
    """Store the vocabulary head's weight column-major (same shape and values, a transposed
    view of its transpose) for decoding: MKL's matrix-vector product of a decoding step at batch
    1 streams that layout about 3x faster than nn.Linear's row-major one, and at batch 1 the head
    (vocab x n_embd) is most of what a step reads. For inference-only models (the loader's): the
    parameter's storage is replaced."""
    head = model.lm_head.weight
    if head.is_contiguous():
        head.data = head.data.t().contiguous().t()
    return model


# ----------------------------------------------------------------------------- HF / MOSS weights

# Non-parameter buffers that older transformers versions and the MOSS checkpoints saved in
# their state dicts (causal mask, masked fill value, rotary table). They carry no weights.
_HF_BUFFER_SUFFIXES = (".attn.causal_mask", ".attn.masked_bias", ".attn.bias", ".attn.embed_positions")


def load_hf_state_dict(model: CodeGenForCausalLM, state_dict: dict, strict: bool = True):
    """Load an HF ``CodeGenForCausalLM`` / MOSS state dict. Names are identical; the only thing
    done here is dropping the non-parameter buffers some checkpoints carry."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_HF_BUFFER_SUFFIXES)}
    return model.load_state_dict(sd, strict=strict)
