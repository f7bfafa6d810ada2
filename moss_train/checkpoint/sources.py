"""Where weights come from: a moss-train checkpoint, an HF CodeGen directory, or a MOSS directory.

Every source answers the same questions, reading as little as it can:

- ``model_config``      the architecture, as a :class:`ModelConfig`;
- ``names`` / ``shape`` which parameters it has and their shapes (no tensor data read);
- ``tensor(name)``      one parameter, read on demand (safetensors and ``.bin`` shards are
                        memory-mapped; a ZeRO checkpoint is consolidated lazily, tensor by
                        tensor, by DeepSpeed's own ``zero_to_fp32``);
- ``tokenizer_pieces``  the vocabulary of the tokenizer the weights were trained with, when it
                        can be loaded, to tell which token rows are new.

A *moss-train checkpoint* is a ``step_N`` directory (with ``complete.json``), a ``checkpoints``
directory (its ``latest``), or a run directory (its ``checkpoints/latest``). An *HF directory*
has a ``config.json`` whose ``model_type`` is ``codegen`` (``transformers``' CodeGen) or
``moss`` (the fnlp/moss-moon-003-* releases: the same weights and names, custom code for
``transformers``). Configs are read as JSON and mapped here, so no code shipped with a
checkpoint ever runs; weights are read with safetensors or ``torch.load(weights_only=True)``.
A MOSS release's tokenizer is read from its files (moss_train/tokenizer.py), without its code;
another tokenizer that needs custom code runs it only with ``stage.trust_remote_code``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from moss_train.checkpoint import safe_load
from moss_train.checkpoint.store import COMPLETE, LATEST, CheckpointError, read_complete, verify_or_raise
from moss_train.model.codegen import _HF_BUFFER_SUFFIXES
from moss_train.model.config import ModelConfig, from_hf_config
from moss_train.tokenizer import is_moss_release_tokenizer, moss_release_tokenizer, sp_piece

HF_MODEL_TYPES = ("codegen", "moss")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def log(message: str) -> None:
    print(f"[moss-train] {message}", flush=True)


# ----------------------------------------------------------------------------- moss-train


def resolve_step_dir(path: str | Path) -> Path:
    """A step_N directory from a step, checkpoints or run directory (following `latest`)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        pointer = root / LATEST
        if pointer.is_file():
            step_dir = root / pointer.read_text().strip()
            if not (step_dir / COMPLETE).is_file():
                raise CheckpointError(f"{pointer} names {step_dir.name}, which is not a complete checkpoint")
            return step_dir
    raise CheckpointError(
        f"{path} is not a moss-train checkpoint: expected a step directory with {COMPLETE}, a checkpoints "
        f"directory with `{LATEST}`, or a run directory with checkpoints/{LATEST}"
    )


class MossTrainCheckpoint:
    """A DeepSpeed checkpoint written by moss-train (any ZeRO stage, any number of ranks)."""

    kind = "moss-train"

    def __init__(self, path: str | Path):
        self.step_dir = resolve_step_dir(path)
        self.path = self.step_dir
        self.complete = read_complete(self.step_dir)

    def verify(self, rank: int = 0, world_size: int = 1) -> None:
        """Checksums of every file (shared out over ranks; collective when distributed)."""
        verify_or_raise(self.step_dir, rank, world_size)

    @property
    def meta(self) -> dict:
        """The run's client state at save time (step, stage, model config, ...)."""
        meta = self.complete.get("meta")
        if meta is None:  # written before complete.json carried it: read DeepSpeed's copy
            states = sorted(self.step_dir.glob("*model_states.pt"))
            meta = safe_load.load(states[0], map_location="cpu", mmap=True)
        return meta

    @cached_property
    def model_config(self) -> ModelConfig:
        if "model_config" not in self.meta:
            raise CheckpointError(f"{self.step_dir}: the checkpoint does not record its model config")
        return ModelConfig(**self.meta["model_config"])

    @property
    def run_dir(self) -> Optional[Path]:
        parent = self.step_dir.parent
        return parent.parent if parent.name == "checkpoints" else None

    def recipe(self):
        """The run's recipe (run_dir/config.yaml, as the run wrote it), or None."""
        config = self.run_dir / "config.yaml" if self.run_dir else None
        if config is None or not config.is_file():
            return None
        from omegaconf import OmegaConf

        return OmegaConf.load(config)

    def recipe_tokenizer(self) -> Optional[Path]:
        """The tokenizer directory the run's recipe (run_dir/config.yaml) names, if it exists."""
        recipe = self.recipe()
        return recipe_path(recipe.data.tokenizer) if recipe is not None else None

    @cached_property
    def _state(self) -> dict:
        """name -> lazy tensor. ZeRO 1-3: DeepSpeed's zero_to_fp32 (fp32 master weights,
        consolidated over every rank's shard); ZeRO 0: the module state DeepSpeed saved."""
        safe_load.refuse_unsafe_files(self.step_dir)
        if any(self.step_dir.glob("*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with safe_load.weights_only():  # zero_to_fp32 itself unpickles with weights_only=False
                return get_fp32_state_dict_from_zero_checkpoint(
                    str(self.step_dir.parent), tag=self.step_dir.name, lazy_mode=True
                )
        states = self.step_dir / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise CheckpointError(f"{self.step_dir}: neither ZeRO optimizer shards nor mp_rank_00_model_states.pt")
        return dict(safe_load.load(states, map_location="cpu", mmap=True)["module"])

    @property
    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple:
        return tuple(self._state[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[name].contiguous()

    def tokenizer_pieces(self, trust_remote_code: bool = False) -> Optional[list[str]]:
        directory = self.recipe_tokenizer()
        return _pieces(_load_tokenizer(directory)) if directory else None


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def recipe_path(path: str) -> Optional[Path]:
    """A path from a run's recipe, where it exists: absolute, or relative to the working
    directory or the repository (where the launch scripts run)."""
    candidates = [Path(path)] if Path(path).is_absolute() else [Path.cwd() / path, _repo_root() / path]
    return next((c for c in candidates if c.exists()), None)


# ----------------------------------------------------------------------------- HF / MOSS


def hf_model_config(config: dict, where: str) -> ModelConfig:
    """Map an HF CodeGen or MOSS config.json (as a dict) to a ModelConfig.

    MOSS's keys are CodeGen's; its releases also carry ``n_ctx`` (read when ``n_positions`` is
    absent) and, for the quantized variants, ``wbits`` (< 16 cannot be trained and fails here).
    Keys either leaves out take ``transformers.CodeGenConfig``'s defaults.
    """
    from transformers import CodeGenConfig

    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not one of {', '.join(HF_MODEL_TYPES)}")
    if int(config.get("wbits", 32)) < 16:
        raise CheckpointError(
            f"{where}: a {config['wbits']}-bit quantized checkpoint cannot be trained; use the fp16 release"
        )
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise CheckpointError(
            f"{where}: a quantized ({method}) export is for inference in transformers; "
            "moss-train reads full-precision weights"
        )
    fields = CodeGenConfig().to_dict()
    fields.update(config)
    if "n_positions" not in config and "n_ctx" in config:
        fields["n_positions"] = config["n_ctx"]
    return from_hf_config(SimpleNamespace(**fields))


class HFDirectory:
    """An HF CodeGen or MOSS model directory (safetensors or .bin, single or sharded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        self.kind = self.config.get("model_type")
        self.model_config = hf_model_config(self.config, str(self.path / "config.json"))
        self._open: dict[str, object] = {}
        self._weight_map = self._find_weights()

    def verify(self, rank: int = 0, world_size: int = 1) -> None:
        """HF directories carry no checksums; safetensors headers are checked when read."""

    def _find_weights(self) -> dict[str, str]:
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (self.path / index).is_file():
                return json.loads((self.path / index).read_text())["weight_map"]
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if (self.path / single).is_file():
                return {name: single for name in self._file(single).keys()}
        raise CheckpointError(
            f"{self.path}: no weights ({SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX} or {BIN_SINGLE})"
        )

    def _file(self, filename: str):
        """An open shard: safetensors via safe_open, .bin memory-mapped with weights_only."""
        if filename not in self._open:
            path = self.path / filename
            if filename.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[filename] = safe_open(str(path), framework="pt")
            else:
                self._open = {}  # one .bin shard mapped at a time
                self._open[filename] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[filename]

    @property
    def names(self) -> list[str]:
        return [n for n in self._weight_map if not n.endswith(_HF_BUFFER_SUFFIXES)]

    def shape(self, name: str) -> tuple:
        handle = self._file(self._weight_map[name])
        return tuple(handle.get_slice(name).get_shape()) if hasattr(handle, "get_slice") else tuple(handle[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        handle = self._file(self._weight_map[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]

    def tokenizer_pieces(self, trust_remote_code: bool = False) -> Optional[list[str]]:
        """The directory's own tokenizer, through AutoTokenizer. A tokenizer that needs custom
        code (a MOSS release's tokenization_moss.py) loads only with trust_remote_code."""
        if not any((self.path / f).is_file() for f in TOKENIZER_FILES):
            return None
        if is_moss_release_tokenizer(self.path):  # read from its files; its code never runs
            tokenizer = moss_release_tokenizer(self.path)
            return [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
        from transformers import AutoTokenizer, PretrainedConfig

        try:
            # A plain config, so AutoTokenizer never imports the model's own configuration code
            # (configuration_moss.py): trust_remote_code is granted to the tokenizer only.
            tokenizer = AutoTokenizer.from_pretrained(
                str(self.path), config=PretrainedConfig(), trust_remote_code=trust_remote_code
            )
        except Exception as error:  # custom code refused, or files transformers cannot read
            needs_code = "trust_remote_code" in str(error) or "custom code" in str(error)
            reason = (
                "it needs custom code; set stage.trust_remote_code=true to run it"
                if needs_code
                else str(error).splitlines()[0]
            )
            log(f"the tokenizer in {self.path} was not loaded ({reason}); its vocabulary is compared by size only")
            return None
        return [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]


# ----------------------------------------------------------------------------- any


def _load_tokenizer(directory: Path):
    """A run's tokenizer: the project's loader (MOSS sentencepiece or any HF directory)."""
    import moss_train.tokenizer as tokenizers

    loader = getattr(tokenizers, "load_tokenizer", None)
    return loader(directory) if loader else tokenizers.MossTokenizer.load(directory)


def _pieces(tokenizer) -> list[str]:
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def run_tokenizer_pieces(tokenizer) -> list[str]:
    """A tokenizer's vocabulary in one spelling (spaces as "▁", as sentencepiece stores them)."""
    return [sp_piece(p) for p in _pieces(tokenizer)]


# Small tensors that any training changes: together, the identity of a set of weights.
FINGERPRINT_TENSORS = ("transformer.ln_f.weight", "transformer.ln_f.bias")


def weights_fingerprint(source) -> str:
    """sha256 of a few small tensors of `source` (fp32): tells whether two sources hold the same
    trained weights (LoRA adapters fit only the base they were trained on), cheaply at any size."""
    import hashlib

    digest = hashlib.sha256()
    for name in FINGERPRINT_TENSORS:
        digest.update(name.encode() + source.tensor(name).detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def open_source(path: str | Path):
    """The weight source at `path`: a moss-train checkpoint, or an HF CodeGen / MOSS directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or model directory")
    if (path / "config.json").is_file():
        return HFDirectory(path)
    return MossTrainCheckpoint(path)
