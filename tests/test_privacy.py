"""Privacy and checkpoint safety, tried for real.

* Unique strings planted in the patient tags of real DICOM series (PatientName, PatientID, birth
  date, institution, accession number, ...) must not appear in any file train.py or predict.py
  write (run folders, cache, W&B offline runs, checkpoints, CSVs, logs) nor in what they print.
* A checkpoint carrying a pickle payload is refused by train.py and predict.py, and the payload
  never runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
import torch

from covidct.checkpoint import read_checkpoint
from covidct.data.synthetic import SyntheticSpec, ensure_dataset
from covidct.errors import DataError
from tests.conftest import REPO, cli_env, tiny

pytestmark = pytest.mark.slow

#: tag -> planted value; each is unique enough never to occur by chance
PHI = {
    "PatientName": "Qzxwolmert^Vibsandor",
    "PatientID": "PHIID48213977",
    "PatientBirthDate": "18870419",
    "InstitutionName": "Sankt Ylvanor Hospital",
    "AccessionNumber": "ACC7731902",
    "ReferringPhysicianName": "Drukovitz^Pelmaro",
    "PatientAddress": "17 Quillowby Lane",
    "OtherPatientIDs": "OTHID55120983",
    "StudyID": "STU66120",
}
NEEDLES = [part.encode() for value in PHI.values() for part in value.split("^")]


def plant_phi(root: Path) -> int:
    """Write the PHI values into every DICOM file under ``root``; returns the number of files."""
    files = sorted(root.rglob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        for tag, value in PHI.items():
            setattr(ds, tag, value)
        ds.save_as(path)
    return len(files)


def leaks(paths: list[Path], texts: dict[str, str]) -> list[str]:
    """Where any needle occurs: in files (zip members, e.g. checkpoints, searched uncompressed) or texts."""
    found = []
    for path in paths:
        blobs = [(str(path), path.read_bytes())]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs += [(f"{path}:{name}", z.read(name)) for name in z.namelist()]
        found += [f"{where}: {n.decode()}" for where, blob in blobs for n in NEEDLES if n.lower() in blob.lower()]
    found += [
        f"{name}: {n.decode()}" for name, text in texts.items() for n in NEEDLES if n.decode().lower() in text.lower()
    ]
    return found


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = cli_env()
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_leak_search_finds_a_planted_string(tmp_path):  # the search below can fail
    (tmp_path / "a.txt").write_bytes(b"xx" + NEEDLES[3] + b"yy")
    with zipfile.ZipFile(tmp_path / "b.ckpt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80" + NEEDLES[0] * 50)
    assert len(leaks([tmp_path / "a.txt"], {})) == 1
    assert any("b.ckpt:archive/data.pkl" in hit for hit in leaks([tmp_path / "b.ckpt"], {}))
    assert leaks([], {"stderr": "PHIID48213977 seen"}) == ["stderr: PHIID48213977"]


def test_patient_tags_never_reach_any_output(tmp_path):
    spec = SyntheticSpec(patients_per_class=(2, 2, 2), slices_min=6, slices_max=8, image_size=64, seed=3)
    data = tmp_path / "hospital export"
    shutil.copytree(ensure_dataset(tmp_path / "gen", spec), data)
    assert plant_phi(data) >= 36
    assert pydicom.dcmread(next(data.rglob("*.dcm"))).PatientName == PHI["PatientName"]  # really planted
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"

    trained = run(
        "train.py",
        [
            "data=covid_ct_md",
            f"data.root={data}",
            "data.image_size=32",
            "data.batch_size=8",
            "data.val_fraction=0.5",
            "data.label_mode=patient",
            "data.cache_workers=1",
            f"paths.cache_dir={cache}",
            f"paths.log_dir={outputs}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.enable_progress_bar=false",
            "logger=wandb",
        ],
        tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next(outputs.rglob("last.ckpt"))
    predicted = run(
        "predict.py",
        [
            f"ckpt_path={ckpt}",
            f"input={data / 'COVID-19 subjects'}",
            "num_workers=0",
            f"paths.log_dir={outputs}",
            "progress=false",
        ],
        tmp_path,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]

    written = files_under(outputs, cache)
    names = {p.name for p in written}
    assert {
        "last.ckpt",
        "patients.csv",
        "data_summary.json",
        "split.csv",
        "manifest.json",
        "train.log",
        "prediction.json",
    } <= names
    assert any(p.suffix == ".wandb" for p in written)  # the W&B offline run is searched too
    texts = {
        "train stdout": trained.stdout,
        "train stderr": trained.stderr,
        "predict stdout": predicted.stdout,
        "predict stderr": predicted.stderr,
    }
    assert leaks(written, texts) == []


class Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path, shared_cache):
    out = tmp_path / "run"
    trained = run("train.py", [*tiny(shared_cache), "logger=none", f"hydra.run.dir={out}"], REPO)
    assert trained.returncode == 0, trained.stderr[-3000:]
    good = out / "checkpoints" / "last.ckpt"
    marker = tmp_path / "payload-ran"
    ckpt = read_checkpoint(good)
    ckpt["callbacks"]["innocent looking"] = Payload(marker)
    tampered = tmp_path / "tampered.ckpt"
    torch.save(ckpt, tampered)

    with pytest.raises(DataError, match=r"refused: the file holds Python objects.*system"):
        read_checkpoint(tampered)
    resumed = run(
        "train.py",
        [*tiny(shared_cache), "logger=none", f"ckpt_path={tampered}", f"hydra.run.dir={tmp_path / 'resumed'}"],
        REPO,
    )
    patients = next(shared_cache.glob("synthetic-*")) / "Normal subjects"
    predicted = run("predict.py", [f"ckpt_path={tampered}", f"input={patients}", f"paths.log_dir={tmp_path}"], REPO)
    for result in (resumed, predicted):
        assert result.returncode == 1 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(cut)
