"""Checkpoints that are not covidct checkpoints, and resumes with other settings, tried for real.

* Files that are no checkpoint (empty, text, CSV, JSON, random bytes, a zip, a plain ``state_dict``,
  a dict without ``hyper_parameters``) are refused by ``read_checkpoint`` in one line naming the file and
  what it is not, by ``train.py ckpt_path=`` and ``predict.py`` too, without a traceback; only a pickle
  that names a Python global is called code.
* A resume whose windows, image size or backbone differ from the checkpoint's is refused before any
  data is read, naming each key and both values; the same windows written another way are accepted.
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from covidct.errors import ConfigError, DataError
from covidct.models.checkpoint import read_checkpoint
from covidct.training.run import train
from tests.conftest import compose_train, run_cli, tiny, write_ct_slice


def random_bytes(n: int = 4096, first: int | None = None) -> bytes:
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    return data if first is None else bytes([first]) + data[1:]


def write_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


#: file name -> (how to write it, what the message must say)
FOREIGN = {
    "empty.ckpt": (lambda p: p.write_bytes(b""), "not a PyTorch checkpoint (empty file)"),
    "notes.ckpt": (lambda p: p.write_text("ward PC epoch 12\n"), "not a PyTorch checkpoint (a text file)"),
    "patients.csv": (lambda p: p.write_text("patient,class\nP001,CAP\n"), "not a PyTorch checkpoint (a CSV file)"),
    "metrics.json": (lambda p: p.write_text('{"score": 0.9}\n'), "not a PyTorch checkpoint (a JSON file)"),
    "random.ckpt": (lambda p: p.write_bytes(random_bytes(first=0x17)), "not a PyTorch checkpoint (binary data"),
    "random_pickle_byte.ckpt": (lambda p: p.write_bytes(random_bytes(first=0x80)), "not a readable PyTorch checkpoint"),
    "other.zip": (write_zip, "not a readable PyTorch checkpoint"),
    "resnet18_state_dict.pth": (
        lambda p: torch.save(torchvision.models.resnet18().state_dict(), p),
        "a plain state_dict (122 tensors, e.g. 'conv1.weight'), not a covidct/Lightning "
        "checkpoint: it has no hyper_parameters",
    ),
    "list.pt": (lambda p: torch.save([torch.zeros(2)], p), "not a covidct/Lightning checkpoint: it holds a list"),
    "weights_only_dict.ckpt": (
        lambda p: torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, p),
        "not a covidct/Lightning checkpoint: it has no hyper_parameters",
    ),
    "other_lightning.ckpt": (
        lambda p: torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, p),
        "not written by covidct's train.py: its hyper_parameters have no 'preprocessing'",
    ),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_a_file_that_is_no_covidct_checkpoint_is_refused_in_one_line(tmp_path, name):
    write, expected = FOREIGN[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"ckpt_path={path}: ") and expected in message
    assert "\n" not in message and "could run code" not in message


class Payload:
    """Unpickling this would run a command."""

    def __reduce__(self):
        return os.system, ("true",)


def test_only_a_pickled_global_is_called_code(tmp_path):
    path = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"preprocessing": {}}, "extra": Payload()}, path)
    with pytest.raises(DataError, match=r"could run code when loaded \(Trying to load unsupported GLOBAL posix.system"):
        read_checkpoint(path)


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, script)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert out.returncode == 1 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_train_and_predict_refuse_foreign_files_in_one_line(tmp_path, shared_cache):
    state_dict, json_file = tmp_path / "resnet18_state_dict.pth", tmp_path / "metrics.json"
    for name, path in (("resnet18_state_dict.pth", state_dict), ("metrics.json", json_file)):
        FOREIGN[name][0](path)
    patient = tmp_path / "test set" / "P001"
    for i in range(3):
        write_ct_slice(patient / f"{i}.dcm", np.full((32, 32), -700, np.int16), slice_location=float(i))

    trained = run(
        "train.py",
        [*tiny(shared_cache), "logger=none", f"ckpt_path={state_dict}", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
    )
    assert f"ckpt_path={state_dict}: a plain state_dict" in one_error_line(trained)
    assert not (tmp_path / "run" / "data_summary.txt").exists()  # refused before any data was read
    for ckpt, expected in ((state_dict, "a plain state_dict"), (json_file, "not a PyTorch checkpoint (a JSON file)")):
        predicted = run("predict.py", [f"ckpt_path={ckpt}", f"input={patient}", f"paths.log_dir={tmp_path}"], tmp_path)
        assert f"ckpt_path={ckpt}: {expected}" in one_error_line(predicted)


@pytest.mark.slow
def test_resume_with_other_input_backbone_targets_or_rule_is_refused_before_any_data_is_read(
    tmp_path, shared_cache, tiny_checkpoint
):
    changed = ["data.image_size=64", "data.windows=[lung,bone]", "model=vgg16", "vote=mil", "data.label_mode=patient"]
    cfg = compose_train(
        tmp_path / "resumed", tiny(shared_cache) + ["logger=none", f"ckpt_path={tiny_checkpoint}", *changed]
    )
    with pytest.raises(ConfigError) as caught:
        train(cfg)
    message = str(caught.value)
    assert message.startswith(f"ckpt_path={tiny_checkpoint} cannot be resumed")
    assert "data.windows: checkpoint ['lung'], this run ['lung', 'bone']" in message
    assert "data.image_size: checkpoint 32, this run 64" in message
    assert "model.backbone: checkpoint 'resnet18', this run 'vgg16'" in message
    assert "vote.rule: checkpoint 'infected_fraction', this run 'mil'" in message
    assert "data.label_mode: checkpoint 'paper', this run 'patient'" in message
    assert not (tmp_path / "resumed").exists() or not any((tmp_path / "resumed").iterdir())  # no data read
