"""Read checkpoints safely: tensors and plain data only, never arbitrary pickled objects."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from covidct.errors import DataError


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint dict at ``path`` (tensors on the CPU), read with torch's weights-only unpickler.

    A file whose pickle names any other Python object (a payload that would run code when loaded,
    e.g. ``os.system``) is refused with :class:`DataError`, as is a missing, cut-short or foreign
    file; ``key`` is the config key the path came from, for the message. covidct's own checkpoints
    hold only tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={path}: file not found (checkpoints are in <run>/checkpoints/).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise DataError(
            f"{key}={path}: refused: the file holds Python objects other than tensors and plain data, which "
            f"could run code when loaded ({detail}). covidct never writes such objects: the file was changed or "
            "comes from elsewhere. Use a checkpoint from a source you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise DataError(
            f"{key}={path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "It may be cut short: use another one from <run>/checkpoints/."
        ) from None
