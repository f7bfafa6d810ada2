"""int8 / int4 weight-only exports: an HF export whose linear layers are stored quantized, which
``AutoModelForCausalLM.from_pretrained(dir)`` loads through the ``quantization_config`` that
config.json carries (the quantization library installed: ``pip install 'moss-train[quantize]'``).

The library is bitsandbytes (chosen by bench/quantized_export.py, figures in bench/RESULTS.md):
on a CPU it runs int8 (LLM.int8: a scale per row) and 4-bit NF4 (blocks of 64 weights sharing
a scale), stores both in safetensors, and packs 4-bit
weights two to a byte. torchao, the alternative measured, is kept as a choice for the bench:
on a CPU in version 0.18 its int4 weight-only format needs GPU kernels, and its CPU int4
(``IntxWeightOnlyConfig``) keeps each 4-bit value in a byte (no smaller than int8).
optimum-quanto's quantized models cannot be saved by transformers (``save_pretrained`` refuses
them), so it cannot make an export. In every scheme the vocabulary head (``lm_head``) and the
embedding stay in full precision; LayerNorms and biases are not quantized.
"""

from __future__ import annotations

from pathlib import Path

SCHEMES = ("int8", "int4")
DEFAULT_LIBRARY = "bitsandbytes"
KEEP = ["lm_head"]  # full precision: the logits


def quantization_config(scheme: str, library: str = DEFAULT_LIBRARY):
    """transformers' quantization config of `scheme` in `library`."""
    import torch

    if scheme not in SCHEMES:
        raise ValueError(f"quantization {scheme!r} is not one of {', '.join(SCHEMES)}")
    if library == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if scheme == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=KEEP,
        )
    if library == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        from transformers import TorchAoConfig

        config = (
            Int8WeightOnlyConfig()
            if scheme == "int8"
            else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        )
        return TorchAoConfig(config, modules_to_not_convert=KEEP)
    raise ValueError(f"quantization library {library!r} is not one of bitsandbytes, torchao")


def quantize_export(
    directory: Path, scheme: str, max_shard_size: int | str = "5GB", library: str = DEFAULT_LIBRARY
) -> list[str]:
    """Replace the full-precision weights of the causal-LM export in `directory` by `scheme`'s
    (quantized from them, on the CPU), as safetensors; config.json gains the quantization
    config. Returns the weight files."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    module = {"bitsandbytes": "bitsandbytes", "torchao": "torchao"}.get(library, library)
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"a {scheme} export needs {library}: pip install 'moss-train[quantize]'")
    directory = Path(directory)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), quantization_config=quantization_config(scheme, library), device_map="cpu"
    )
    for stale in [*directory.glob("model*.safetensors"), directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True, max_shard_size=max_shard_size)
    files = sorted(p.name for p in directory.glob("model*.safetensors"))
    for name in files:
        (directory / name).chmod(0o644)  # safetensors writes owner-only files; a model is for sharing
    return files
