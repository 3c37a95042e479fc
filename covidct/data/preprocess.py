"""Hounsfield units to model-ready uint8 channels: one channel per intensity window, resized."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from covidct.errors import ConfigError

#: Common CT windows (level, width) in HU.
PRESET_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}


@dataclass(frozen=True)
class Window:
    """An intensity window: HU in [level - width/2, level + width/2] maps linearly to 0..255."""

    level: float
    width: float

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """float HU (any shape) -> uint8 of the same shape."""
        low = self.level - self.width / 2.0
        scaled = (hu - low) * (255.0 / self.width)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def parse_windows(spec: Sequence[str | Mapping[str, float]], key: str = "data.windows") -> tuple[Window, ...]:
    """Windows from config: preset names (``lung``, ``mediastinum``, ``bone``) or ``{level, width}``."""
    if isinstance(spec, (str, Mapping)):
        spec = [spec]  # type: ignore[list-item]
    windows = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            if item not in PRESET_WINDOWS:
                raise ConfigError(
                    f"{key}[{i}]={item!r} is not a known window; use one of {sorted(PRESET_WINDOWS)} "
                    "or {level: HU, width: HU}"
                )
            windows.append(Window(*PRESET_WINDOWS[item]))
        elif isinstance(item, Mapping) and set(item) == {"level", "width"}:
            level, width = _hu(item["level"], f"{key}[{i}].level"), _hu(item["width"], f"{key}[{i}].width")
            if width <= 0:
                raise ConfigError(f"{key}[{i}].width must be > 0 HU, got {item['width']}")
            windows.append(Window(level, width))
        else:
            raise ConfigError(f"{key}[{i}]={item!r}: expected a preset name or {{level: HU, width: HU}}")
    if not windows:
        raise ConfigError(f"{key} is empty: give at least one window, e.g. [lung]")
    return tuple(windows)


def _hu(value: object, key: str) -> float:
    """A finite number of HU from config, else a ConfigError naming ``key``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number of HU, got {value!r}")
    return number


@dataclass(frozen=True)
class SlicePreprocessor:
    """HU slice -> uint8 (C, size, size), one channel per window. Picklable for worker processes."""

    windows: tuple[Window, ...]
    image_size: int
    lung_crop: bool = False

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """float32 (rows, cols) HU -> uint8 (len(windows), image_size, image_size)."""
        rows, cols = hu.shape
        size = self.image_size
        if (rows, cols) != (size, size):
            shrinking = rows > size or cols > size
            hu = cv2.resize(hu, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        return np.stack([w.apply(hu) for w in self.windows])


def one_thread_per_worker() -> None:
    """In a DataLoader worker, keep OpenCV (albumentations, resizing) to one thread: the workers
    already run in parallel, and more threads per worker only fight over the cores (measured: the
    cache loader delivers 1.35x more slices/s on 2 cores)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        cv2.setNumThreads(1)
