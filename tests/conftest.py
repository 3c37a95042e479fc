"""Shared fixtures: the real COVID-CT-MD sample (skipped when absent) and a tiny DICOM writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from covidct.config import register_resolvers

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(os.environ.get("COVIDCT_SAMPLE_DIR", REPO.parent / "shared" / "data" / "covid-ct-md-sample"))


PYTHON_STARTS: list[str] = []
"""The Python processes the suite started (``subprocess`` with this interpreter), reported at the end."""
_popen_init = subprocess.Popen.__init__


def _counting_popen_init(self, args, *rest, **kwargs) -> None:
    if isinstance(args, (list, tuple)) and args and str(args[0]) == sys.executable:
        PYTHON_STARTS.append(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _counting_popen_init


def pytest_sessionfinish(session) -> None:
    """Under pytest-xdist, a worker hands its process starts to the controller (:func:`pytest_testnodedown`)."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["python_starts"] = list(PYTHON_STARTS)


def pytest_testnodedown(node, error) -> None:
    """pytest-xdist (a dev dependency) on the controller: add up the starts of a worker that finished."""
    PYTHON_STARTS.extend(getattr(node, "workeroutput", {}).get("python_starts", []))


def pytest_terminal_summary(terminalreporter) -> None:
    """One line: how many Python processes the tests started (each costs an import of torch + Lightning)."""
    terminalreporter.write_line(f"python process starts: {len(PYTHON_STARTS)} (in {len(set(PYTHON_STARTS))} tests)")


def cli_env() -> dict[str, str]:
    """Environment for a ``train.py`` / ``predict.py`` subprocess: W&B offline, and without the W&B
    service address that an in-process W&B run of this pytest process left in ``os.environ`` (a child
    would join that service, which outlives the child: a SIGKILLed run's id would stay "in use")."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return env | {"WANDB_MODE": "offline"}


class RecordingLogger:
    """A stand-in Lightning logger for stand-in trainers: every scalar given to ``log_metrics``, merged."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


def stand_in_validation(
    patient_ids: list[str], patient_labels: np.ndarray, loggers: list | None = None
) -> tuple[SimpleNamespace, SimpleNamespace, RecordingLogger]:
    """(trainer, LightningModule, recorder) stand-ins to drive the patient vote callback through validation epoch 0
    on rank 0, without Lightning: ``module.lightning_logged`` gets what Lightning's ``log_dict`` would (val/*), the
    recorder (one of the trainer's loggers, after ``loggers``) what the vote gives the loggers directly."""
    from covidct.data.datamodule import SliceTable

    logged: dict[str, float] = {}
    module = SimpleNamespace(
        log_dict=lambda metrics, sync_dist: logged.update(metrics), patient_votes=None, lightning_logged=logged
    )
    empty = np.zeros(0, dtype=np.int64)
    table = SliceTable(patient_ids, np.asarray(patient_labels), empty, empty, empty, empty, empty, ())
    recorder = RecordingLogger()
    trainer = SimpleNamespace(
        sanity_checking=False,
        datamodule=SimpleNamespace(slice_table=table),
        world_size=1,
        is_global_zero=True,
        current_epoch=0,
        global_step=0,
        loggers=[*(loggers or []), recorder],
    )
    return trainer, module, recorder


def tiny(cache_dir: Path) -> list[str]:
    """Train overrides for a run of a few seconds: 12 small synthetic patients, 32 px, 2 batches, no MIL fit."""
    return [
        "data.synthetic.patients_per_class=[4,4,4]",
        "data.synthetic.slices_min=8",
        "data.synthetic.slices_max=10",
        "data.synthetic.image_size=64",
        "data.image_size=32",
        "data.batch_size=16",
        "data.val_fraction=0.5",
        "data.cache_workers=1",
        f"paths.cache_dir={cache_dir}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "vote.mil=false",  # ~5 s of MIL fitting per validation epoch; tests/test_aggregation.py runs it (vote=mil)
    ]


def compose_train(output_dir: Path, overrides: list[str]) -> DictConfig:
    """The real train config composed with ``overrides``, as ``python train.py`` would see it."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(REPO)
        del cfg.hydra
    return cfg


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One generated-data and slice cache folder for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The real 3-patient COVID-CT-MD sample; tests using it skip when it is not on this machine."""
    if not (SAMPLE_DIR / "Index.csv").is_file():
        pytest.skip(f"real COVID-CT-MD sample not found at {SAMPLE_DIR} (set COVIDCT_SAMPLE_DIR to its folder)")
    return SAMPLE_DIR


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    *,
    slice_location: float | None = None,
    position_z: float | None = None,
    instance_number: int | None = None,
    intercept: float | None = -1024.0,
    slope: float | None = 1.0,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    modality: str = "CT",
) -> Path:
    """Write one uncompressed CT slice whose pixels, through the rescale, give ``hu`` (int16 HU).

    ``signed``: int16 pixels (PixelRepresentation 1) instead of uint16."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "ANONYMOUS"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    # MONOCHROME1 changes only how a viewer displays the values (DICOM PS3.3 C.7.6.3.1.2), not the values
    stored = (np.asarray(hu, dtype=np.float64) - (intercept or 0.0)) / (slope or 1.0)
    ds.PixelData = np.rint(stored).astype(np.int16 if signed else np.uint16).tobytes()
    if intercept is not None:
        ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    if slice_location is not None:
        ds.SliceLocation = slice_location
    if position_z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, position_z]
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, shared_cache) -> tuple[Path, Path]:
    """(best checkpoint, run folder) of one tiny in-process training (resnet18, lung window, 32 px),
    shared by every test of the session that needs a trained model."""
    from covidct.training.run import train

    run = tmp_path_factory.mktemp("tiny_run")
    result = train(compose_train(run, tiny(shared_cache) + ["logger=none"]))
    return Path(result.best_checkpoint), run


@pytest.fixture(scope="session")
def tiny_checkpoint(trained) -> Path:
    """``last.ckpt`` of the session's tiny training (:func:`trained`)."""
    return trained[1] / "checkpoints" / "last.ckpt"


def run_cli(args: list[str], cwd: Path, script: str = "train.py") -> subprocess.CompletedProcess:
    """``python <script> <args>`` from ``cwd``, run in this process (:mod:`tests.in_process`): exit code and
    captured stdout / stderr as a CompletedProcess. ``script`` may be ``-m covidct.<module>``."""
    from tests.in_process import run_command

    return run_command(args, cwd, script, env={"WANDB_MODE": "offline"})


def run_cli_process(args: list[str], cwd: Path, script: str = "train.py") -> subprocess.CompletedProcess:
    """``python <script> <args>`` as a real process in ``cwd`` with :func:`cli_env`; output captured as text.
    For the few tests that need a process of their own (the ``__main__`` guard, import side effects)."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600
    )
