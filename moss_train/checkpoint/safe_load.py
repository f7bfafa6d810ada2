"""Reading checkpoint files without running code from them.

A ``.pt`` file is a pickle, and unpickling can call any Python function the file names: a
crafted ``mp_rank_00_model_states.pt`` runs a shell command when read with
``torch.load(weights_only=False)``. The checksums in ``complete.json`` do not help, because
whoever writes the file writes them too. So every checkpoint file is read in torch's
weights-only mode, which rebuilds tensors, containers and numbers and refuses every other
global, with exactly the few DeepSpeed types its ZeRO files hold allowed
(:func:`deepspeed_types`).

DeepSpeed's own readers (the engine's ``load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``
and the universal loader) call ``torch.load(..., weights_only=False)`` and take no option to
change it. Inside :func:`weights_only` they run with torch's documented switch
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` on, which overrides the argument of every ``torch.load``.
Before that, :func:`refuse_unsafe_files` lists the globals each file names (read from its
pickle, nothing executed) and refuses a file naming any other, so the error names the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path

import torch

from moss_train.errors import CheckpointError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_types() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (ZeRO 1-3, fp32 /
    bf16 / fp16): the ZeRO stage, the loss scaler, and ZeRO 1/2's parameter slice addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def refuse_unsafe_files(directory: str | Path) -> None:
    """CheckpointError naming the first ``.pt`` file under `directory` that names a global
    weights-only loading does not allow (nothing of the file is executed to find out)."""
    allowed = {_qualified(cls) for cls in deepspeed_types()}
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as error:  # not a zip-format torch file: nothing we can vouch for
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint file ({type(error).__name__}: {error})"
            ) from None
        refused = sorted(set(unsafe) - allowed)
        if refused:
            raise CheckpointError(
                f"{path} would run code when loaded: it names {', '.join(refused[:4])}, which is not "
                "tensor data; refused (checkpoints are read in weights-only mode)"
            )


@contextlib.contextmanager
def weights_only():
    """Every ``torch.load`` inside, DeepSpeed's included, reads in weights-only mode with
    DeepSpeed's types allowed; a file that needs more raises CheckpointError."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            yield
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refused to load a checkpoint file (read in weights-only mode): {_reason(error)}"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def _reason(error: pickle.UnpicklingError) -> str:
    """The part of torch's weights-only error that says what the file asked for."""
    text = str(error)
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return f"it names {named.group(1)}, which is not tensor data"
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return detail.group(1) if detail else " ".join(text.split())[:300]


def load(path: str | Path, **kwargs):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's types allowed; CheckpointError
    naming the file when it holds anything else."""
    try:
        with weights_only():
            return torch.load(path, weights_only=True, **kwargs)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
