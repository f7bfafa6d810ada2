"""The CodeGen-architecture (MOSS) model, its config, and HF weight compatibility."""

from moss_train.model.codegen import CodeGenForCausalLM, load_hf_state_dict
from moss_train.model.config import (
    ModelConfig,
    flops_per_token,
    from_hf_config,
    model_vocab_size,
    num_parameters,
    padded_vocab_size,
    to_hf_config,
    validate_model_config,
)

__all__ = [
    "CodeGenForCausalLM",
    "ModelConfig",
    "flops_per_token",
    "from_hf_config",
    "load_hf_state_dict",
    "model_vocab_size",
    "num_parameters",
    "padded_vocab_size",
    "to_hf_config",
    "validate_model_config",
]
