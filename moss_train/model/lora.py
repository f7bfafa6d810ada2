"""LoRA adapters through peft: which layers get them, what trains, and the merged weights.

``add_adapters`` puts peft's LoRA layers on the named projections of every block (the weight
names equal HF CodeGen's, so ``qkv_proj``, ``out_proj``, ``fc_in``, ``fc_out`` are also the
target names peft uses on ``transformers.CodeGenForCausalLM``) and leaves only the adapters, and a
reward model's score head, trainable. The base weights stay as loaded, frozen: a checkpoint
saves the trainable parameters only, and the base comes from ``stage.init_from`` again.

In the model, an adapted projection ``...attn.qkv_proj`` becomes peft's layer holding the base
``...attn.qkv_proj.base_layer.weight`` and the adapter ``...qkv_proj.lora_A.default.weight``
(r x in) and ``...lora_B.default.weight`` (out x r, zero at the start, so training starts from
the base exactly). The merged weight is ``W + (alpha / r) * B @ A``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# The block's linear projections, by the name HF's CodeGen gives them too.
LORA_TARGETS = ("qkv_proj", "out_proj", "fc_in", "fc_out")
ADAPTER = "default"  # peft's adapter name (one adapter per model here)
LORA_A, LORA_B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def scaling(settings) -> float:
    """How much of B @ A the merged weight adds: alpha / r."""
    return settings.alpha / settings.r


def peft_config(settings, base_model_name_or_path: str | None = None):
    """peft's LoraConfig for `settings` (anything with r, alpha, dropout, target_modules: the
    recipe's lora group; the adapter directory's adapter_config.json)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def add_adapters(model: nn.Module, settings, seed: int) -> nn.Module:
    """The model with LoRA adapters (initialised from `seed`, the same on every rank); only
    the adapters and the parameters under ``model.trainable_with_adapters`` prefixes train."""
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(peft_config(settings), model, adapter_name=ADAPTER)
    keep = tuple(getattr(model, "trainable_with_adapters", ()))
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name) or name.startswith(keep))
    return model


def is_adapter(name: str) -> bool:
    return name.endswith((LORA_A, LORA_B))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every LoRA layer passes its input through the base weight only."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts (full shapes under ZeRO-3)."""
    sizes = [(int(getattr(p, "ds_numel", p.numel())), p.requires_grad) for p in model.parameters()]
    return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)


def flops_per_token_change(model: nn.Module) -> tuple[float, float]:
    """What adapters change in PaLM's count of training FLOPs per token (model/config.py:
    flops_per_token, where every weight trains): (body, lm_head per row). A frozen weight still
    runs forward and passes the gradient on to its input (4 FLOPs per parameter) but computes no
    gradient of its own (the count's other 2); each adapter adds its full 6. The input embedding
    is a lookup, in neither count."""
    body = head = 0.0
    for name, param in model.named_parameters():
        numel = int(getattr(param, "ds_numel", param.numel()))
        if is_adapter(name):
            change = 6 * numel
        elif not param.requires_grad and name != "transformer.wte.weight":
            change = -2 * numel
        else:
            continue
        if name.startswith("lm_head."):
            head += change
        else:
            body += change
    return body, head


def adapted_weights(adapter_names) -> dict[str, tuple[str, str]]:
    """base weight name (as in the plain model) -> (lora_A name, lora_B name), from the names of
    a checkpoint's adapter tensors."""
    out = {}
    for name in adapter_names:
        if name.endswith(LORA_A):
            module = name[: -len(LORA_A)]
            out[f"{module}.weight"] = (name, f"{module}{LORA_B}")
    return out


def merged(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, in fp32."""
    return base.float() + scaling * (lora_b.float() @ lora_a.float())


def peft_key(name: str) -> str:
    """The name peft's adapter_model.safetensors gives an adapter tensor of this model."""
    return "base_model.model." + name.replace(f".{ADAPTER}.", ".")
