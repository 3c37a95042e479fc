"""``make bench`` rows 1 and 2, reading slices: model-ready slices/s from the slice cache vs decoding DICOM
every epoch vs the paper's JPEG files (loader), and slices/s of a cache build with workers vs one process vs
raw ``pydicom`` decoding, and with vs without ``data.lung_crop`` (cache build)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from covidct.bench.measure import Row, timed
from covidct.contracts import CONF_DIR

if TYPE_CHECKING:
    import albumentations as A
    import torch
    from torch.utils.data import Dataset

    from covidct.data.layout import PatientFolder
    from covidct.data.preprocess import SlicePreprocessor


def training_augmentation() -> A.Compose:
    """The default training augmentation, instantiated from ``conf/data/synthetic.yaml``."""
    import albumentations as A
    from hydra.utils import instantiate

    transforms = OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml").train_transforms
    return A.Compose([instantiate(t) for t in transforms])


def slice_files(patients: list[PatientFolder]) -> list[Path]:
    """Every file of the patients' folders (what a loader or a cache build reads)."""
    from covidct.data.dicom import list_files

    return [f for p in patients for f in list_files(p.folder)]


class DicomSlices:
    """Decode a DICOM file every time: HU -> windows -> resize -> augmentation (a map-style dataset)."""

    def __init__(self, files: list[Path], pre: SlicePreprocessor, transform: A.Compose) -> None:
        self.files, self.pre, self.transform = files, pre, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        import pydicom

        from covidct.data.dicom import to_hounsfield
        from covidct.data.preprocess import one_thread_per_worker
        from covidct.data.slice_dataset import to_model_input

        one_thread_per_worker()
        return to_model_input(self.pre(to_hounsfield(pydicom.dcmread(self.files[i]))), self.transform)


class JpegSlices:
    """The paper's route: 8-bit lung-window JPEG files (made once), decoded every time, resized, augmented."""

    def __init__(self, files: list[Path], image_size: int, transform: A.Compose) -> None:
        self.files, self.image_size, self.transform = files, image_size, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        import cv2
        import numpy as np
        from PIL import Image

        from covidct.data.preprocess import one_thread_per_worker
        from covidct.data.slice_dataset import to_model_input

        one_thread_per_worker()
        with Image.open(self.files[i]) as im:
            image = np.asarray(im)
        image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        return to_model_input(image[None], self.transform)


def convert_to_jpeg(files: list[Path], pre: SlicePreprocessor, out_dir: Path) -> list[Path]:
    """DICOM -> full-size lung-window JPEG (quality 95), as the paper prepared its data."""
    import pydicom
    from PIL import Image

    from covidct.data.dicom import to_hounsfield

    out_dir.mkdir(parents=True, exist_ok=True)
    window = pre.windows[0]
    jpegs = []
    for i, f in enumerate(files):
        path = out_dir / f"{i:06d}.jpg"
        Image.fromarray(window.apply(to_hounsfield(pydicom.dcmread(f)))).save(path, quality=95)
        jpegs.append(path)
    return jpegs


def loader_throughput(dataset: Dataset, batch_size: int, workers: int) -> float:
    """Slices/s of the second epoch through a DataLoader (the first one starts the workers)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    for _ in loader:
        pass
    seconds = timed(lambda: [None for _ in loader])
    return len(dataset) / seconds


def measure_loaders(
    patients: list[PatientFolder], pre: SlicePreprocessor, cfg: DictConfig, work: Path, data: str, with_jpeg: bool
) -> list[Row]:
    """Slices/s (augmentation on) from the slice cache vs decoding DICOM every epoch; ``with_jpeg``: also vs the
    paper's JPEG files (converted once into ``work``)."""
    import numpy as np

    from covidct.data.cache import build_or_load_cache
    from covidct.data.slice_dataset import SliceDataset

    cache = build_or_load_cache(patients, pre, work / "cache", workers=cfg.cache_build.workers)
    n = len(cache.patient)
    transform = training_augmentation()
    rows_all = np.arange(n)
    cached = SliceDataset(
        cache.path, cache.images.shape, rows_all, np.zeros(n, np.int64), cache.patient, cache.slice_index, transform
    )
    bs, workers = cfg.loader.batch_size, cfg.loader.num_workers
    rate_cache = loader_throughput(cached, bs, workers)
    files = slice_files(patients)
    rate_dicom = loader_throughput(DicomSlices(files, pre, transform), bs, workers)
    rows = [
        Row(
            "loader",
            data,
            "cache",
            rate_cache,
            "DICOM every epoch",
            rate_dicom,
            "slices/s",
            ">= 20x",
            rate_cache / rate_dicom >= 20,
        )
    ]
    if with_jpeg:
        jpegs = convert_to_jpeg(files, pre, work / "jpeg")
        rate_jpeg = loader_throughput(JpegSlices(jpegs, pre.image_size, transform), bs, workers)
        rows.append(Row("loader", data, "cache", rate_cache, "JPEG files (paper)", rate_jpeg, "slices/s"))
    return rows


def measure_cache_build(
    patients: list[PatientFolder], pre: SlicePreprocessor, workers: int, work: Path, data: str, repeats: int = 1
) -> list[Row]:
    """Slices/s of a cache build with 1 process vs raw decoding (alternating ``repeats`` times, the best
    of each counts), then with ``workers`` processes."""
    import pydicom

    from covidct.data.cache import build_or_load_cache

    files = slice_files(patients)

    def decode() -> float:
        return len(files) / timed(lambda: [pydicom.dcmread(f).pixel_array for f in files])

    def build(n_workers: int) -> float:
        target = Path(tempfile.mkdtemp(dir=work))
        seconds = timed(lambda: build_or_load_cache(patients, pre, target, workers=n_workers))
        shutil.rmtree(target)
        return len(files) / seconds

    pairs = [(decode(), build(1)) for _ in range(repeats)]  # the first decode also warms the page cache
    raw, one = max(p[0] for p in pairs), max(p[1] for p in pairs)
    many = build(workers)
    return [
        Row("cache build", data, "1 process", one, "raw pydicom decode", raw, "slices/s", ">= 0.8x", one / raw >= 0.8),
        Row("cache build", data, f"{workers} workers", many, "1 process", one, "slices/s"),
    ]


def measure_lung_crop(
    patients: list[PatientFolder], pre: SlicePreprocessor, workers: int, work: Path, data: str, repeats: int = 1
) -> list[Row]:
    """Seconds of a cache build with ``lung_crop`` vs without (alternating ``repeats`` times, the best of
    each counts): the cost of the lung mask and the crop (target: at most 1.5x)."""
    from dataclasses import replace

    from covidct.data.cache import build_or_load_cache

    def build(p: SlicePreprocessor) -> float:
        target = Path(tempfile.mkdtemp(dir=work))
        seconds = timed(lambda: build_or_load_cache(patients, p, target, workers=workers))
        shutil.rmtree(target)
        return seconds

    crop = replace(pre, lung_crop=True)
    pairs = [(build(crop), build(pre)) for _ in range(repeats)]
    cropped, plain = min(p[0] for p in pairs), min(p[1] for p in pairs)
    label = f"{data}, {workers} process{'es' if workers > 1 else ''}"
    return [
        Row(
            "cache lung crop",
            label,
            "lung_crop=true",
            cropped,
            "lung_crop=false",
            plain,
            "s",
            "<= 1.5x",
            cropped / plain <= 1.5,
        )
    ]
