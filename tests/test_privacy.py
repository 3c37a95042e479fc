"""Privacy and checkpoint safety, tried for real.

* Unique strings planted in the patient tags of real DICOM series (PatientName, PatientID, birth
  date, institution, accession number, ...) must not appear in any file train.py or predict.py
  write (run folders, cache, W&B offline runs, checkpoints, CSVs, logs) nor in what they print.
* Patient folders named like identifiers (``DOE^JANE_19650312``, ``MRN004211``) never reach the W&B
  run (tables, captions, drawn-in captions' source text, report page, media names, console capture)
  with ``privacy.pseudonymize=true``: keyed pseudonyms do, the same for the same secret in every run,
  others for another secret; the local mapping file maps them back; the secret itself is never written.
* A checkpoint carrying a pickle payload is refused by train.py and predict.py, and the payload
  never runs.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import torch

from covidct.data.synthetic import SyntheticSpec, ensure_dataset
from covidct.errors import ConfigError, DataError
from covidct.models.checkpoint import read_checkpoint
from covidct.training.privacy import (
    Pseudonymizer,
    identifier_shapes,
    instantiate_logger,
    load_secret,
    pseudonymizer_of,
    pseudonymizing,
)
from tests.conftest import REPO, compose_train, run_cli, tiny

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
    return run_cli(args, cwd, script)


def test_the_leak_search_finds_a_planted_string(tmp_path):  # the search below can fail
    (tmp_path / "a.txt").write_bytes(b"xx" + NEEDLES[3] + b"yy")
    with zipfile.ZipFile(tmp_path / "b.ckpt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80" + NEEDLES[0] * 50)
    assert len(leaks([tmp_path / "a.txt"], {})) == 1
    assert any("b.ckpt:archive/data.pkl" in hit for hit in leaks([tmp_path / "b.ckpt"], {}))
    assert leaks([], {"stderr": "PHIID48213977 seen"}) == ["stderr: PHIID48213977"]


@pytest.mark.slow
def test_patient_tags_never_reach_any_output(tmp_path):
    spec = SyntheticSpec(patients_per_class=(2, 2, 2), slices_min=8, slices_max=10, image_size=64, seed=3)
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


@pytest.mark.slow
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


# ---- folder names: pseudonyms for what goes to W&B ----------------------------------------------------

#: class folder -> patient folders named the way hospital exports name them
IDENTIFIER_FOLDERS = {
    "COVID-19 subjects": ["DOE^JANE_19650312", "MRN004211"],
    "Cap subjects": ["SMITH^JOHN^Q", "ACC88120934"],
    "Normal subjects": ["Pt 1971-02-03", "NHS4857773456"],
}
FOLDER_NAMES = [name for names in IDENTIFIER_FOLDERS.values() for name in names]
#: a patient folder without a readable slice: named only by the log line that says it is skipped
SKIPPED_FOLDER = "KOWALSKI^ANNA_19580704"
PSEUDONYM = re.compile(rb"pt-[0-9a-f]{10}")


def test_pseudonyms_are_keyed_stable_and_short():
    one, same, other = Pseudonymizer(b"k" * 32), Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    names = FOLDER_NAMES
    assert [one(n) for n in names] == [same(n) for n in names]  # stable: results join across runs
    assert all(one(n) != other(n) for n in names)  # keyed: another secret, other pseudonyms
    assert all(re.fullmatch(r"pt-[0-9a-f]{10}", one(n)) for n in names) and len({one(n) for n in names}) == 6
    assert re.fullmatch(r"pt-[0-9a-f]{16}", Pseudonymizer(b"k" * 32, length=16)("MRN004211"))
    # HMAC-SHA256(b"k" * 32, b"MRN004211"), from Python's hmac module: the hash the docs promise
    assert one("MRN004211") == "pt-" + hmac.new(b"k" * 32, b"MRN004211", hashlib.sha256).hexdigest()[:10]
    off = Pseudonymizer(None)
    assert not off.active and off("MRN004211") == "MRN004211"
    assert "kkkk" not in repr(one) and one.active
    with pytest.raises(ConfigError, match="privacy.pseudonym_length"):
        Pseudonymizer(b"k" * 32, length=4)


def test_the_secret_file_is_made_once_private_and_reused(tmp_path):
    path = tmp_path / "config" / "covidct" / "secret"
    secret = load_secret(path)
    assert re.fullmatch(rb"[0-9a-f]{64}", secret) and path.read_bytes() == secret + b"\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_secret(path) == secret  # never replaced: the pseudonyms stay the same
    assert load_secret(tmp_path / "other") != secret
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="privacy.secret_file=.*fewer than 16"):
        load_secret(tmp_path / "short")
    assert not list(path.parent.glob(".secret.*"))  # no temporary file left behind


def test_identifier_shaped_folder_names_are_found():
    found = dict(identifier_shapes([*FOLDER_NAMES, "P001", "cap012", "normal001", "patient_12", "case-2021"]))
    assert set(found) == set(FOLDER_NAMES)
    assert found["SMITH^JOHN^Q"].startswith("a DICOM person name") and found["Pt 1971-02-03"] == "a date"
    assert "digits" in found["MRN004211"] and dict(identifier_shapes(["12.03.1965"])) == {"12.03.1965": "a date"}


def test_auto_pseudonymizes_exactly_the_online_runs():
    assert pseudonymizing("auto", online=True) and not pseudonymizing("auto", online=False)
    assert pseudonymizing("True", online=False) and not pseudonymizing("false", online=True)
    with pytest.raises(ConfigError, match="privacy.pseudonymize must be auto, true or false"):
        pseudonymizing("maybe", online=True)


def test_online_without_pseudonyms_warns_once_about_identifier_shaped_folders(caplog):
    caplog.set_level(logging.WARNING, logger="covidct.training.privacy")
    online_off = Pseudonymizer(None, online=True)
    online_off.prepare(FOLDER_NAMES + ["P001"])
    online_off.prepare(FOLDER_NAMES)  # the second callback: no second warning
    (warning,) = caplog.records
    assert "privacy.pseudonymize=true" in warning.message and "6 of 7 patient folder names" in warning.message
    assert not any(name in warning.message for name in FOLDER_NAMES)  # the warning itself names nobody
    caplog.clear()
    Pseudonymizer(None, online=False).prepare(FOLDER_NAMES)  # offline
    Pseudonymizer(b"k" * 32, online=True).prepare(FOLDER_NAMES)  # pseudonymized
    Pseudonymizer(None, online=True).prepare(["P001", "cap001", "normal001"])  # nothing identifier-shaped
    assert caplog.records == []


def test_the_mapping_file_maps_pseudonyms_back(tmp_path):
    pseudonym = Pseudonymizer(b"k" * 32, mapping_file=tmp_path / "pseudonyms.csv")
    pseudonym.prepare(FOLDER_NAMES)
    rows = list(csv.DictReader((tmp_path / "pseudonyms.csv").open()))
    assert {r["pseudonym"]: r["patient"] for r in rows} == {pseudonym(n): n for n in FOLDER_NAMES}
    Pseudonymizer(None, mapping_file=tmp_path / "none.csv").prepare(FOLDER_NAMES)
    assert not (tmp_path / "none.csv").exists()  # nothing to map without pseudonyms


def test_the_wandb_logger_carries_its_pseudonymizer_and_stops_console_capture_when_on(tmp_path):
    secret = tmp_path / "secret"
    online = compose_train(tmp_path, ["logger=wandb", "logger.wandb.offline=false", f"privacy.secret_file={secret}"])
    logger = instantiate_logger(online.logger.wandb, online)  # auto + online: on (nothing connects yet)
    assert pseudonymizer_of(logger).active and logger._wandb_init["settings"] == {"console": "off"}
    assert type(logger._wandb_init["settings"]) is dict  # wandb.init ignores any other mapping (a DictConfig)
    assert pseudonymizer_of(logger)("MRN004211") == Pseudonymizer(secret.read_bytes().strip())("MRN004211")

    offline = compose_train(tmp_path, ["logger=wandb", f"privacy.secret_file={tmp_path / 'unused'}"])
    logger = instantiate_logger(offline.logger.wandb, offline)  # auto + offline: off, no secret made
    assert not pseudonymizer_of(logger).active and "settings" not in logger._wandb_init
    assert not (tmp_path / "unused").exists()
    assert "anonymous" not in logger._wandb_init  # Lightning's anonymous=None: a wandb warning on every run

    uploads_checkpoints = compose_train(
        tmp_path,
        ["logger=wandb", "logger.wandb.log_model=true", "privacy.pseudonymize=true", f"privacy.secret_file={secret}"],
    )
    with pytest.raises(ConfigError, match="log_model uploads checkpoints"):
        instantiate_logger(uploads_checkpoints.logger.wandb, uploads_checkpoints)


def identifier_named_export(tmp_path: Path) -> Path:
    """A copy of a small synthetic dataset as a hospital might export it: no label files, patient folders
    named by identifiers (:data:`IDENTIFIER_FOLDERS`), the planted patient tags in every file."""
    spec = SyntheticSpec(patients_per_class=(2, 2, 2), slices_min=8, slices_max=10, image_size=64, seed=3)
    data = tmp_path / "hospital export"
    shutil.copytree(ensure_dataset(tmp_path / "gen", spec), data)
    for extra in [*data.glob("*.csv"), *data.glob("*.npy")]:
        extra.unlink()
    for class_folder, names in IDENTIFIER_FOLDERS.items():
        for patient, name in zip(sorted((data / class_folder).iterdir()), names, strict=True):
            patient.rename(patient.parent / name)
    plant_phi(data)
    (data / "Normal subjects" / SKIPPED_FOLDER).mkdir()
    (data / "Normal subjects" / SKIPPED_FOLDER / "IM0001.dcm").write_bytes(b"DICM cut short")
    return data


@contextmanager
def logged_to_stderr() -> Iterator[None]:
    """Log records (INFO and up) printed on stderr, as train.py's Hydra job logging prints them: the console
    that W&B's capture would record."""
    handler, root = logging.StreamHandler(sys.stderr), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def train_pseudonymized(data: Path, run: Path, cache: Path, secret: Path) -> Path:
    """One tiny in-process training on ``data`` with W&B offline and pseudonyms on; returns the W&B run folder."""
    from covidct.training.run import train

    overrides = [
        "data=covid_ct_md",
        f"data.root={data}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.val_fraction=0.5",
        "data.label_mode=patient",
        "data.cache_workers=1",
        f"paths.cache_dir={cache}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "callbacks.cam_images.every_n_epochs=1",
        "logger=wandb",
        "privacy.pseudonymize=true",
        "privacy.mapping_file=true",
        f"privacy.secret_file={secret}",
    ]
    train(compose_train(run, overrides))
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    return wandb_run


def mapping(run: Path) -> dict[str, str]:
    return {r["patient"]: r["pseudonym"] for r in csv.DictReader((run / "pseudonyms.csv").open())}


@pytest.mark.slow
def test_identifier_folder_names_never_reach_wandb_but_their_pseudonyms_do(tmp_path, capsys):
    data, cache = identifier_named_export(tmp_path), tmp_path / "cache"
    secret, other_secret = tmp_path / "keys" / "secret", tmp_path / "keys" / "other"
    with logged_to_stderr():
        first = train_pseudonymized(data, tmp_path / "first", cache, secret)
    console = capsys.readouterr().err
    assert f"Skipping patient {SKIPPED_FOLDER}" in console  # a log line names it, on the console

    uploaded = files_under(first)  # everything `wandb sync` would upload, binary .wandb history included
    blob = b"\n".join([p.read_bytes() for p in uploaded] + [str(p.relative_to(first)).encode() for p in uploaded])
    assert not [name for name in [*FOLDER_NAMES, SKIPPED_FOLDER] if name.lower().encode() in blob.lower()]
    assert leaks(uploaded, {}) == []  # the planted patient tags neither
    key = secret.read_bytes().strip()
    assert key not in blob and key not in b"\n".join(p.read_bytes() for p in files_under(tmp_path / "first"))
    assert not list(first.rglob("output.log"))  # no console capture: log lines name patients

    pseudonyms = mapping(tmp_path / "first")
    assert set(pseudonyms) == set(FOLDER_NAMES)  # the local mapping maps every pseudonym back
    # the documented pseudonym, computed here: "pt-" + 10 hex digits of HMAC-SHA256(secret file's bytes, folder name)
    assert pseudonyms == {n: "pt-" + hmac.new(key, n.encode(), hashlib.sha256).hexdigest()[:10] for n in FOLDER_NAMES}
    shown = {p.decode() for p in PSEUDONYM.findall(blob)}
    assert len(shown & set(pseudonyms.values())) >= 3 and shown <= set(pseudonyms.values())  # val patients
    media = {p.relative_to(first / "files" / "media").parent.as_posix() for p in first.rglob("media/*/*/*")}
    assert {"images/val", "table/val", "html/report"} <= media, media  # tables, captions, report were logged
    (table,) = first.rglob("media/table/val/patients_*.table.json")
    assert {row[0] for row in json.loads(table.read_text())["data"]} <= set(pseudonyms.values())
    local = (tmp_path / "first" / "patients.csv").read_text()
    assert any(name in local for name in FOLDER_NAMES)  # local files keep the real names

    train_pseudonymized(data, tmp_path / "again", cache, secret)
    assert mapping(tmp_path / "again") == pseudonyms  # same secret: same pseudonyms in another run
    train_pseudonymized(data, tmp_path / "rotated", cache, other_secret)
    rotated = mapping(tmp_path / "rotated")
    assert set(rotated) == set(FOLDER_NAMES) and not set(rotated.values()) & set(pseudonyms.values())
