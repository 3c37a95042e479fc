"""Export to ONNX and predict without PyTorch: parity with the checkpoint (each backbone, the real sample),
the sidecar, int8 quantization, bf16, and bad model files failing with the file's name before any output."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf
from onnx import TensorProto, helper

from covidct.data.preprocess import SlicePreprocessor, parse_windows
from covidct.errors import ConfigError, DataError
from covidct.patients.rules import vote
from covidct.predict.export import bind_sidecar, check_settings, export_onnx
from covidct.predict.onnx_backend import (
    SIDECAR_METADATA,
    NumpyMIL,
    apply_temperature,
    file_sha256,
    load_onnx,
    sidecar_path,
)
from covidct.predict.predictor import run_prediction
from covidct.predict.test_sets import find_test_sets, read_patient
from tests.conftest import REPO, cli_env, run_cli, write_ct_slice

if TYPE_CHECKING:
    from covidct.models.classifier import SliceClassifier

CLASSES = ["COVID-19", "CAP", "Normal"]


# ---- a hand-built ONNX slice model (no torch export: fast) ---------------------------------------
def tiny_onnx(
    path: Path,
    weights: np.ndarray,
    size: int = 16,
    channels: int = 1,
    dtype: int = TensorProto.UINT8,
    batch: str | int = "batch",
) -> Path:
    """images (batch, C, S, S) -> embeddings = mean intensity / 255 per channel (batch, C) -> probabilities =
    softmax(embeddings @ weights - weights.sum(0) / 2) (batch, K): the interface of a covidct export, with a
    known answer."""
    classes = weights.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["x", "scale"], ["xs"]),
            helper.make_node("ReduceMean", ["xs", "axes"], ["embeddings"], keepdims=0),
            helper.make_node("MatMul", ["embeddings", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", dtype, [batch, channels, size, size])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, classes]),
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [batch, channels]),
        ],
        [
            helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("w", TensorProto.FLOAT, list(weights.shape), weights.astype(np.float32).ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, [classes], -weights.sum(0).astype(np.float32) / 2),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def sidecar_content(size: int = 16, classes: list[str] = CLASSES, mil: dict | None = None, **vote_settings) -> dict:
    """The sidecar covidct.predict.export would write (lung window, majority vote), but its model's SHA-256."""
    rule = {
        "rule": "majority",
        "tau": 0.5,
        "k": 5,
        "center_slices": 40,
        "window_slices": 80,
        "slice_threshold": 0.5,
        "threshold_tau": 0.5,
        "temperature": 1.0,
    }
    return {
        "covidct_onnx": 1,
        "precision": "fp32",
        "windows": ["lung"],
        "image_size": size,
        "lung_crop": False,
        "class_names": classes,
        "vote": rule | vote_settings,
        "mil": mil,
    }


def write_sidecar(model: Path, size: int = 16, classes: list[str] = CLASSES, **settings) -> Path:
    """Bind :func:`sidecar_content` to ``model`` as the export does (a copy in its metadata) and write it."""
    side = bind_sidecar(model, sidecar_content(size, classes, **settings))
    sidecar_path(model).write_text(json.dumps(side))
    return sidecar_path(model)


def ct_patient(folder: Path, values: list[float], size: int = 16) -> Path:
    """A patient folder of uncompressed CT slices, slice i filled with HU ``values[i]`` (head first) but for its
    top row, air (-1000 HU): every chest CT shows air, and the reader refuses a series without any."""
    for i, hu in enumerate(values):
        pixels = np.full((size, size), hu, np.int16)
        pixels[0] = -1000
        write_ct_slice(folder / f"IM{i:04d}.dcm", pixels, slice_location=-float(i))
    return folder


def predict_cfg(ckpt: Path, input_path: Path, out: Path, **extra) -> OmegaConf:
    cfg = {
        "ckpt_path": str(ckpt),
        "input": str(input_path),
        "tau": None,
        "tta": False,
        "calibration": True,
        "slice_threshold": None,
        "batch_size": 64,
        "num_workers": 1,
        "device": "cpu",
        "progress": False,
        "cam": False,
        "cam_slices": 4,
        "precision": "fp32",
        "vote": None,
        "paths": {"output_dir": str(out)},
    }
    return OmegaConf.create(cfg | extra)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def probs_of(slice_rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in slice_rows])


# ---- fast tests ---------------------------------------------------------------------------------
def test_onnx_predict_reads_dicom_votes_and_writes_the_usual_outputs(tmp_path):
    """predict on an .onnx model: the same reading, windowing, temperature, vote and CSVs, checked against the
    hand-computed answer of a known graph."""
    weights = np.array([[-4.0, 0.0, 4.0]])  # dark slices favour COVID-19, bright ones Normal
    model = tiny_onnx(tmp_path / "m.onnx", weights)
    write_sidecar(model, temperature=0.5)
    sets = tmp_path / "Test1"
    ct_patient(sets / "T1-001", [-1000, -900, -800])
    ct_patient(sets / "T1-002", [200, 300, -1000, 400])
    out = tmp_path / "out"
    run_prediction(predict_cfg(model, sets, out))
    pre = SlicePreprocessor(parse_windows(["lung"]), 16)
    for pid in ("T1-001", "T1-002"):
        images = read_patient(sets / pid, pre)["images"]
        logits = (images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0)[:, None] @ weights - weights.sum(0) / 2
        p = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum(1, keepdims=True)  # temperature 0.5
        got = probs_of([r for r in rows(out / "Test1_slices.csv") if r["patient"] == pid])
        np.testing.assert_allclose(got, p, atol=1e-4)
        patient = next(r for r in rows(out / "Test1.csv") if r["patient"] == pid)
        assert patient["predicted_class"] == CLASSES[vote(p, "majority", 0.5)] and patient["status"] == "ok"
        # explained as with a checkpoint: the sidecar's rule (majority), its scores (vote shares) and margin
        shares = np.bincount(p.argmax(1), minlength=3) / len(p)
        np.testing.assert_allclose([float(patient[f"score_{c}"]) for c in CLASSES], shares, atol=1e-4)
        np.testing.assert_allclose([float(patient[f"mean_prob_{c}"]) for c in CLASSES], p.mean(0), atol=1e-4)
        margin = max(shares[:2]) - shares[2]
        assert float(patient["decision_quantity"]) == pytest.approx(margin, abs=1e-4)
        assert patient["decision_threshold"] == "0.0" and (margin > 0) == (patient["predicted_class"] != "Normal")
        votes = ", ".join(f"{c} {n}" for c, n in zip(CLASSES, np.bincount(p.argmax(1), minlength=3), strict=True))
        assert patient["decision"] == f"slice votes {votes}: {patient['predicted_class']}"
    calls = {r["patient"]: r["predicted_class"] for r in rows(out / "Test1.csv")}
    assert calls == {"T1-001": "COVID-19", "T1-002": "Normal"}
    record = json.loads((out / "prediction.json").read_text())
    assert record["model_format"] == "onnx" and record["precision"] == "fp32" and record["temperature"] == 0.5
    assert record["onnx"]["model_sha256"] == file_sha256(model) and record["model_file"] == str(model.resolve())


BAD_CASES = {
    "text file": ("not a readable ONNX model", "m.onnx"),
    "no sidecar": ("no sidecar m.onnx.json", "m.onnx"),
    "sidecar of another model": ("does not match", "m.onnx.json"),
    "input size": ("the model takes tensor(uint8) ['batch', 1, 32, 32], but m.onnx.json", "m.onnx"),
    "float input": ("the model takes tensor(float)", "m.onnx"),
    "fixed batch": ("dynamic batch axis", "m.onnx"),
    "classes": ("the model gives ['batch', 4] class probabilities, but m.onnx.json names 3", "m.onnx"),
    "mil head missing": ("m.onnx.mil.npz is missing", "m.onnx"),
    "sidecar not JSON": ("not readable JSON", "m.onnx.json"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_a_bad_model_file_fails_naming_the_file_and_writes_nothing(tmp_path, case):
    model = tmp_path / "m.onnx"
    w3 = np.ones((1, 3))
    if case == "text file":
        model.write_text("patient,class\nP001,COVID-19\n")
    else:
        size = 32 if case == "input size" else 16
        dtype = TensorProto.FLOAT if case == "float input" else TensorProto.UINT8
        tiny_onnx(
            model,
            np.ones((1, 4)) if case == "classes" else w3,
            size,
            dtype=dtype,
            batch=8 if "fixed" in case else "batch",
        )
        if case != "no sidecar":
            side = write_sidecar(model)
        if case == "sidecar of another model":
            tiny_onnx(model, 2 * w3)  # the model changed after its sidecar was written
        if case == "mil head missing":
            write_sidecar(model, mil={"sha256": "0", "init": {"standardize": "center"}})
        if case == "sidecar not JSON":
            side.write_text("{not json")
    patient = ct_patient(tmp_path / "in" / "T1-001", [-800, -700])
    out = tmp_path / "out"
    message, named = BAD_CASES[case]
    with pytest.raises(DataError) as err:
        run_prediction(predict_cfg(model, patient, out))
    assert message in str(err.value) and str(tmp_path / named) in str(err.value), str(err.value)
    assert not out.exists()


def test_onnx_settings_that_need_pytorch_are_refused_before_any_work(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx", np.ones((1, 3)))
    write_sidecar(model)
    patient = ct_patient(tmp_path / "in" / "T1-001", [-800])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"precision=bf16: ckpt_path=.*m.onnx is an ONNX export"):
        run_prediction(predict_cfg(model, patient, out, precision="bf16"))
    with pytest.raises(ConfigError, match="cam=true: Grad-CAM needs"):
        run_prediction(predict_cfg(model, patient, out, cam=True))
    with pytest.raises(ConfigError, match="holds no fitted MIL head"):
        run_prediction(predict_cfg(model, patient, out, vote={"rule": "mil"}))
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "tflite"}, "format='tflite': only onnx"),
        ({"opset": 11}, "opset=11"),
        ({"quantize": "int4"}, "quantize='int4'"),
        ({"quantize": "int8"}, "quantize=int8 needs calibration_input"),
        ({"calibration_slices": 0}, "calibration_slices=0"),
        ({"output": "model.pt"}, "output=model.pt: the model file must end in .onnx"),
    ],
)
def test_export_settings_are_checked_naming_the_key(kwargs, message):
    settings = {
        "format": "onnx",
        "opset": 18,
        "quantize": "none",
        "calibration_input": None,
        "calibration_slices": 32,
        "output": None,
    }
    with pytest.raises(ConfigError, match=message):
        check_settings(**(settings | kwargs))


@pytest.mark.parametrize("standardize", ["center", "none", "center_concat"])
def test_the_numpy_mil_head_decides_as_the_torch_head(standardize):
    from covidct.patients.aggregation import GatedAttentionMIL, predict_proba
    from covidct.predict.export import mil_arrays
    from covidct.predict.settings import PredictorSettings

    torch.manual_seed(0)
    kind = "log_probs" if standardize == "center_concat" else "embeddings"  # as vote.mil_features makes them
    head = GatedAttentionMIL(16, standardize=standardize, slice_features=kind).eval()
    with torch.no_grad():  # a fitted head's buffers are not zeros and ones
        head.shift.uniform_(-0.5, 0.5)
        head.scale.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 16)).astype(np.float32) * 3 for n in (1, 2, 7, 8, 40)]  # odd and even: the median
    settings = PredictorSettings(["lung"], 32, CLASSES, "mil", 0.5, mil_head=head)
    init, data = mil_arrays(settings)
    numpy_head = NumpyMIL.from_npz(data, init, "head.npz")
    assert (numpy_head.standardize, numpy_head.slice_features) == (standardize, kind)
    expected = predict_proba(head, bags)
    np.testing.assert_allclose(np.stack([numpy_head.probabilities(b) for b in bags]), expected, atol=1e-5)
    assert numpy_head.predict(bags).tolist() == expected.argmax(1).tolist()
    # what predict.py's patient CSV shows as the mil rule's scores, from either head
    from covidct.predict.predictor import mil_probabilities

    for b, e in zip(bags, expected, strict=True):
        np.testing.assert_allclose([mil_probabilities(h, b) for h in (head, numpy_head)], [e, e], atol=1e-5)


def test_numpy_temperature_equals_the_calibration_module():
    from covidct.patients.calibration import apply_temperature as torch_temperature

    p = np.random.default_rng(0).dirichlet([1, 1, 1], size=50).astype(np.float32)
    p[0] = [1.0, 0.0, 0.0]  # a zero probability: both clamp it before the log
    for t in (0.25, 1.0, 3.0):
        np.testing.assert_allclose(apply_temperature(p, t), torch_temperature(p, t), atol=1e-7)


def test_bf16_falls_back_to_fp32_without_hardware_support_and_autocasts_when_asked(caplog):
    from covidct.models.classifier import SliceClassifier
    from covidct.predict.torch_backend import bf16_supported, resolve_precision, slice_probabilities

    native, what = bf16_supported(torch.device("cpu"))
    with caplog.at_level("WARNING"):
        used = resolve_precision("bf16", torch.device("cpu"))
    assert used == ("bf16" if native else "fp32")
    assert native or ("predicting in fp32 instead" in caplog.text and what in caplog.text)
    with pytest.raises(ConfigError, match="quantize=int8"):
        resolve_precision("int8", torch.device("cpu"))
    torch.manual_seed(0)
    model = SliceClassifier("resnet18").eval()
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    fp32 = slice_probabilities(model, images, 4)
    bf16 = slice_probabilities(model, images, 4, precision="bf16")  # autocast itself works on any CPU
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - fp32).max() < 0.05


# ---- the sidecar is bound to its model; every vote parameter is checked when the model is loaded ---------
@pytest.fixture
def no_slice_read(monkeypatch):
    """Fail the test if predict reads a DICOM slice (with num_workers=0 it reads in this process)."""

    def refuse(folder: Path, preprocessor: SlicePreprocessor) -> None:
        raise AssertionError(f"a slice of {folder} was read")

    monkeypatch.setattr("covidct.predict.test_sets.read_preprocessed", refuse)


SIDECAR_EDITS = {
    "class_names": lambda side: side | {"class_names": ["Normal", "CAP", "COVID-19"]},  # COVID-19 called Normal
    "windows": lambda side: side | {"windows": ["mediastinum"]},
    "vote.temperature": lambda side: side | {"vote": side["vote"] | {"temperature": 0.0}},
    "vote.tau": lambda side: side | {"vote": side["vote"] | {"tau": 1.5}},
}


def edit_sidecar(model: Path, key: str) -> Path:
    """Edit the sidecar of ``model`` by hand, as :data:`SIDECAR_EDITS` says for ``key``."""
    side = sidecar_path(model)
    side.write_text(json.dumps(SIDECAR_EDITS[key](json.loads(side.read_text())), indent=1))
    return side


def refused(cfg: OmegaConf) -> str:
    """The one-line :class:`DataError` message ``run_prediction(cfg)`` ends with; nothing written."""
    with pytest.raises(DataError) as err:
        run_prediction(cfg)
    assert "\n" not in str(err.value) and not Path(cfg.paths.output_dir).exists(), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("key", list(SIDECAR_EDITS))
def test_an_edited_sidecar_is_refused_before_any_slice_is_read(tmp_path, no_slice_read, key):
    """Class names reordered, another window, temperature 0 or tau 1.5 written into the sidecar by hand: the
    model's copy of its sidecar differs, so predict refuses, naming the sidecar and the key."""
    model = tiny_onnx(tmp_path / "m.onnx", np.array([[-4.0, 0.0, 4.0]]))
    write_sidecar(model)
    side = edit_sidecar(model, key)
    patient = ct_patient(tmp_path / "in" / "T1-001", [-900, -800])
    message = refused(predict_cfg(model, patient, tmp_path / "out", num_workers=0))
    assert message.startswith(f"sidecar {side}: differs in {key} from the copy exported into m.onnx"), message
    assert "export the checkpoint again with python -m covidct.predict.export" in message


def test_an_export_from_before_the_binding_is_refused_saying_to_export_again(tmp_path, no_slice_read):
    """A sidecar written beside a model without a copy of it (an export made before they were bound): its
    content cannot be vouched for, so it is refused."""
    model = tiny_onnx(tmp_path / "m.onnx", np.array([[-4.0, 0.0, 4.0]]))
    sidecar_path(model).write_text(json.dumps(sidecar_content() | {"model_sha256": file_sha256(model)}))
    patient = ct_patient(tmp_path / "in" / "T1-001", [-900])
    message = refused(predict_cfg(model, patient, tmp_path / "out", num_workers=0))
    assert message.startswith(f"{model}: holds no copy of its sidecar m.onnx.json"), message
    assert "export the checkpoint again" in message


BAD_VOTES = [
    ({"rule": "infected_fraction", "tau": 1.5}, "vote.tau must be in [0, 1] (a fraction of slices), got 1.5"),
    ({"rule": "threshold", "threshold_tau": -0.1}, "vote.threshold_tau must be in [0, 1]"),
    ({"rule": "threshold", "slice_threshold": 1.5}, "vote.slice_threshold must be in [0, 1)"),
    ({"temperature": 0.0}, "vote.temperature must be a finite number > 0 (it divides the logits), got 0.0"),
    ({"temperature": float("nan")}, "vote.temperature must be a finite number > 0"),
    ({"rule": "topk_mean", "k": 0}, "vote.k must be an integer >= 1 (slices), got 0"),
    ({"rule": "weighted_center", "center_slices": 0}, "vote.center_slices must be an integer >= 1"),
    ({"rule": "weighted_center", "window_slices": 2.5}, "vote.window_slices must be an integer >= 1"),
    ({"rule": "weighted_center", "window_slices": 10}, "vote.window_slices=10 must be >= vote.center_slices=40"),
    ({"rule": "median"}, "vote.rule='median' is not known"),
    ({"k": None}, "vote.k must be an integer >= 1 (slices), got None"),
]


@pytest.mark.parametrize(("vote_settings", "message"), BAD_VOTES)
def test_vote_parameters_out_of_range_in_a_sidecar_are_refused_before_any_slice_is_read(
    tmp_path, no_slice_read, vote_settings, message
):
    """An export whose sidecar (and the model's copy of it) holds a vote parameter out of range: refused when
    the model is loaded, naming the sidecar and the key (temperature 0 gave NaN probabilities with status ok,
    tau 1.5 a traceback after every slice was read)."""
    model = tiny_onnx(tmp_path / "m.onnx", np.array([[-4.0, 0.0, 4.0]]))
    side = write_sidecar(model, **vote_settings)
    patient = ct_patient(tmp_path / "in" / "T1-001", [-900, -800])
    got = refused(predict_cfg(model, patient, tmp_path / "out", num_workers=0))
    assert got.startswith(f"sidecar {side}: {message}") and got.endswith("which writes them together"), got


@pytest.fixture(scope="module")
def random_resnet18(tmp_path_factory) -> Path:
    """A checkpoint of a random-weight resnet18 at 32 px without a vote state (predict's defaults)."""
    path = tmp_path_factory.mktemp("random_resnet18") / "random.ckpt"
    random_checkpoint("resnet18", path, 32, torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8))
    return path


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"temperature": 0.0}, "vote.temperature must be a finite number > 0 (it divides the logits), got 0.0"),
        ({"tau": 1.5}, "vote.tau must be in [0, 1] (a fraction of slices), got 1.5"),
        ({"window_slices": 0}, "vote.window_slices must be an integer >= 1 (slices), got 0"),
    ],
)
def test_vote_parameters_out_of_range_in_a_checkpoint_are_refused_before_any_slice_is_read(
    random_resnet18, tmp_path, no_slice_read, state, message
):
    """A checkpoint whose vote state holds a parameter out of range: predict and the export refuse it when it
    is loaded, naming the checkpoint and the key."""
    data = torch.load(random_resnet18, map_location="cpu", weights_only=True)
    data["hyper_parameters"]["preprocessing"]["vote_rule"] = "infected_fraction"
    data["callbacks"] = {"PatientVoteCallback{'rule': 'infected_fraction'}": state}
    ckpt = tmp_path / "bad.ckpt"
    torch.save(data, ckpt)
    patient = ct_patient(tmp_path / "in" / "T1-001", [-900, -800])
    got = refused(predict_cfg(ckpt, patient, tmp_path / "out", num_workers=0))
    assert got.startswith(f"ckpt_path={ckpt}: {message}; ") and "as train.py saved it" in got, got
    with pytest.raises(DataError, match=f"ckpt_path={ckpt}: vote"):
        export_onnx(ckpt, tmp_path / "bad.onnx")
    assert not list(tmp_path.glob("bad.onnx*"))


def test_the_int8_export_is_bound_to_its_own_sidecar(tmp_path):
    """quantize=int8 writes a new sidecar (precision, checks): the int8 model holds a copy of that one, so it
    loads and an edit of its sidecar is refused; an edited fp32 sidecar cannot be quantized into an export."""
    model = tiny_onnx(tmp_path / "m.onnx", np.array([[-4.0, 0.0, 4.0]]))
    write_sidecar(model)
    calibration = ct_patient(tmp_path / "calibration" / "P1", [-900, -500, 0, 100])
    settings = {"quantize": "int8", "calibration_input": calibration.parent, "calibration_slices": 4}
    int8_model = export_onnx(model, tmp_path / "m.int8.onnx", **settings)[0]
    int8 = load_onnx(int8_model, "cpu")
    copy = json.loads(int8.model.session.get_modelmeta().custom_metadata_map[SIDECAR_METADATA])
    assert copy["precision"] == int8.sidecar["precision"] == "int8" and copy["model_file"] == "m.int8.onnx"
    side = edit_sidecar(int8_model, "class_names")
    with pytest.raises(DataError, match=f"sidecar {side}: differs in class_names"):
        load_onnx(int8_model, "cpu")
    side = edit_sidecar(model, "vote.temperature")
    with pytest.raises(DataError, match=f"sidecar {side}: differs in vote.temperature"):
        export_onnx(model, tmp_path / "again.int8.onnx", **settings)
    assert not list(tmp_path.glob("again*"))


# ---- slow: real exports -------------------------------------------------------------------------
def real_slices(real_sample: Path, dest: Path, n: int = 6) -> Path:
    """A patient folder with ``n`` of P001's real DICOM files (JPEG Lossless), evenly spaced."""
    files = sorted((real_sample / "COVID-19 subjects" / "P001").glob("*.dcm"))
    dest.mkdir(parents=True)
    for f in [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]:
        shutil.copy(f, dest / f.name)
    return dest


def random_checkpoint(backbone: str, path: Path, image_size: int, warm_images: torch.Tensor) -> SliceClassifier:
    """Save a covidct checkpoint of a random-weight ``backbone`` at ``path`` and return its model (eval mode).
    Its batch-norm statistics are those of ``warm_images`` (real slices), so that its activations, and the
    probabilities compared, are not degenerate (random EfficientNet-B0 otherwise gives every slice the same)."""
    from covidct.models.classifier import SliceClassifier

    torch.manual_seed(0)
    preprocessing = {"windows": ["lung"], "image_size": image_size, "lung_crop": False, "vote_rule": "majority"}
    model = SliceClassifier(backbone, in_channels=1, preprocessing=preprocessing)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # the running statistics become those of the batch
    model.train()
    with torch.no_grad():
        model(warm_images)
    model.eval()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg16", "vgg16_bn", "resnet50", "efficientnet_b0"])
def test_onnx_slice_probabilities_match_the_checkpoint_for_each_backbone(real_sample, tmp_path, backbone):
    """Random weights at 64 px on 6 real slices: the export (onnxruntime) vs the checkpoint's model (PyTorch)
    within 1e-4, same argmax and the same patient call (resnet18: the trained checkpoint, whole sample)."""
    from covidct.predict.torch_backend import slice_probabilities_and_embeddings

    folder = real_slices(real_sample, tmp_path / "P001")
    images = read_patient(folder, SlicePreprocessor(parse_windows(["lung"]), 64))["images"]
    ckpt = tmp_path / f"{backbone}.ckpt"
    model = random_checkpoint(backbone, ckpt, 64, torch.from_numpy(images))
    expected, features = slice_probabilities_and_embeddings(model, torch.from_numpy(images), 4)
    del model
    written = export_onnx(ckpt, tmp_path / f"{backbone}.onnx", check_slices=2)
    assert [p.name for p in written] == [f"{backbone}.onnx", f"{backbone}.onnx.json"]
    export = load_onnx(tmp_path / f"{backbone}.onnx", "cpu")
    got, embeddings = export.model.run(images, batch_size=4, embeddings=True)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(embeddings - features).max() <= 1e-3 * max(1.0, np.abs(features).max())  # float32 over 50 layers
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
    assert vote(got, "majority", 0.5) == vote(expected, "majority", 0.5)
    assert np.ptp(expected, axis=0).max() > 1e-3  # the slices get different answers: the test has teeth
    side = json.loads(sidecar_path(tmp_path / f"{backbone}.onnx").read_text())
    assert side["backbone"] == backbone and side["source_checkpoint_sha256"] == file_sha256(ckpt)
    assert export.model.session.get_inputs()[0].shape[0] == "batch"


def with_mil_head(ckpt: Path, dest: Path) -> Path:
    """A copy of ``ckpt`` with a fitted MIL head in its vote state and ``mil`` as its vote rule."""
    from covidct.patients.aggregation import fit_mil, mil_state

    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(12, 512)).astype(np.float32) + c for c in (0, 1, 2) for _ in range(2)]
    head = fit_mil(bags, [0, 0, 1, 1, 2, 2], epochs=20)
    key = next(k for k in data["callbacks"] if k.startswith("PatientVoteCallback"))
    data["callbacks"][key]["mil"] = mil_state(head)
    data["hyper_parameters"]["preprocessing"]["vote_rule"] = "mil"
    torch.save(data, dest)
    return dest


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> tuple[Path, list[Path]]:
    """(the session's tiny trained checkpoint with a MIL head, the files of its fp32 export)."""
    tmp = tmp_path_factory.mktemp("tiny_export")
    ckpt = with_mil_head(tiny_checkpoint, tmp / "tiny_mil.ckpt")
    return ckpt, export_onnx(ckpt, tmp / "export" / "tiny.onnx")


@pytest.mark.slow
def test_predict_with_the_onnx_export_matches_the_checkpoint_on_the_real_sample(tiny_export, real_sample):
    """predict.py's per-patient work (:func:`predict_patient`: slice probabilities, temperature, vote) with the
    trained checkpoint and with its export, on the 3 real patients read once by predict's ONNX reader: every
    slice probability within 1e-4, every patient call the same (the MIL head, and a rule on probabilities), and
    the patient CSV's explanation of the call the same (the head's probabilities as the mil rule's scores)."""
    from covidct.predict.predictor import call_patient, patient_row, predict_patient
    from covidct.predict.settings import settings_from_sidecar
    from covidct.predict.test_sets import read_patients
    from covidct.predict.torch_backend import load_checkpoint

    ckpt, written = tiny_export
    assert [p.name for p in written] == ["tiny.onnx", "tiny.onnx.mil.npz", "tiny.onnx.json"]
    model, settings = load_checkpoint(ckpt, torch.device("cpu"))
    export = load_onnx(written[0], "cpu")
    onnx_settings = settings_from_sidecar(export.sidecar, export.mil_head)
    same = ("windows", "image_size", "class_names", "vote_rule", "tau", "slice_threshold", "temperature", "k")
    assert {k: getattr(settings, k) for k in same} == {k: getattr(onnx_settings, k) for k in same}
    assert settings.vote_rule == "mil" and settings.temperature != 1.0  # the head and the calibration are used
    pre = SlicePreprocessor(parse_windows(settings.windows), settings.image_size)
    patients = [p for t in find_test_sets(real_sample) for p in t.patients]
    diffs, calls = [], []
    for item in read_patients(patients, pre, num_workers=2):
        pa, call_a = predict_patient(model, torch.from_numpy(item["images"]), settings)
        pb, call_b = predict_patient(export.model, item["images"], onnx_settings)
        diffs.append(np.abs(pa - pb).max())
        rule = [vote(p, "infected_fraction", settings.tau) for p in (pa, pb)]
        calls.append((item["folder"].name, call_a, call_b, *rule))
        explained = []
        for m, images, s in (
            (model, torch.from_numpy(item["images"]), settings),
            (export.model, item["images"], onnx_settings),
        ):
            probs, call, head_probs = call_patient(m, images, s)
            assert head_probs is not None and int(head_probs.argmax()) == call
            explained.append(patient_row(item, probs, call, s.class_names, s.vote, head_probs))
        columns = ["decision_quantity", *(f"score_{c}" for c in CLASSES)]
        np.testing.assert_allclose(
            [[r[c] for c in columns] for r in explained][0], [explained[1][c] for c in columns], atol=2e-4
        )
        assert explained[0]["decision"].startswith("head fitted on all validation patients: P COVID-19 ")
    assert len(calls) == 3 and max(diffs) <= 1e-4, (diffs, calls)
    assert all(a == b and c == d for _, a, b, c, d in calls), calls
    side = json.loads(written[-1].read_text())
    assert side["source_checkpoint_sha256"] == file_sha256(ckpt) and side["mil"]["init"]["in_features"] == 512
    assert side["export_check"]["max_abs_prob_diff"] <= 1e-4


@pytest.mark.slow
def test_int8_export_is_quantized_calibrated_on_real_slices_and_close_to_fp32(tiny_export, real_sample, tmp_path):
    """quantize=int8 of the fp32 export, calibrated on 8 real slices: QDQ nodes and int8 weights, a smaller
    file, probabilities near fp32's, the same sidecar settings and MIL head."""
    _, written = tiny_export
    folder = real_slices(real_sample, tmp_path / "calibration" / "P001", n=8)
    out = tmp_path / "tiny.int8.onnx"
    files = export_onnx(written[0], out, quantize="int8", calibration_input=folder.parent, calibration_slices=8)
    assert [p.name for p in files] == ["tiny.int8.onnx", "tiny.int8.onnx.mil.npz", "tiny.int8.onnx.json"]
    side = json.loads(sidecar_path(out).read_text())
    assert side["precision"] == "int8" and side["calibration"]["slices"] == 8
    assert side["vote"] == json.loads(written[-1].read_text())["vote"]
    graph = onnx.load(out).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert any(t.data_type == TensorProto.INT8 for t in graph.initializer)  # int8 weights
    assert out.stat().st_size < written[0].stat().st_size / 2
    int8, fp32 = load_onnx(out, "cpu"), load_onnx(written[0], "cpu")
    assert int8.mil_head is not None
    pre = SlicePreprocessor(parse_windows(side["windows"]), side["image_size"])
    images = read_patient(folder, pre)["images"]
    diff = np.abs(int8.model.probabilities(images) - fp32.model.probabilities(images)).max()
    assert 0 < diff < 0.1 and diff == pytest.approx(side["export_check"]["max_abs_prob_diff"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["class_names", "vote.temperature", "vote.tau"])
def test_predict_refuses_an_edited_sidecar_of_a_real_export(tiny_export, real_sample, tmp_path, no_slice_read, key):
    """The trained checkpoint's export (MIL head included), its sidecar edited by hand (class names reordered:
    COVID-19 would be called Normal; temperature 0; tau 1.5), predicting a real patient: refused before any slice
    is read, naming the sidecar and the key. The copy as exported loads."""
    _, written = tiny_export
    for path in written:
        shutil.copy(path, tmp_path / path.name)
    model = tmp_path / written[0].name
    assert load_onnx(model, "cpu").mil_head is not None
    side = edit_sidecar(model, key)
    patient = real_slices(real_sample, tmp_path / "in" / "P001", n=2)
    message = refused(predict_cfg(model, patient, tmp_path / "out", num_workers=0))
    assert message.startswith(f"sidecar {side}: differs in {key} from the copy exported into tiny.onnx"), message


@pytest.mark.slow
def test_the_export_command_line_ends_a_bad_setting_in_one_line(tmp_path):
    args = [f"ckpt_path={tmp_path / 'x.ckpt'}", "quantize=int8", f"paths.log_dir={tmp_path}"]
    out = run_cli(args, tmp_path, "-m covidct.predict.export")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "quantize=int8 needs calibration_input" in lines[0], out.stderr
    assert not list(tmp_path.rglob("*.onnx*"))


NO_TORCH_PROBE = textwrap.dedent("""
    import builtins, json, runpy, sys

    predict, importers, original = sys.argv[1], set(), builtins.__import__

    def spy(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch" or name.startswith("torch."):
            importers.add((globals or {}).get("__name__", "?"))
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = spy
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(predict, run_name="__main__")
    except SystemExit as exc:
        assert not exc.code, exc.code
    pytorch = ("torch", "pytorch_lightning", "torchvision", "torchmetrics", "covidct.predict.torch_backend",
               "covidct.models.classifier", "covidct.patients.calibration", "covidct.patients.aggregation")
    print("PROBE " + json.dumps({"importers": sorted(i for i in importers if i.startswith("covidct")),
                                 "pytorch_modules": [m for m in pytorch if m in sys.modules]}))
""")


@pytest.mark.slow
def test_predict_py_with_an_onnx_model_imports_no_pytorch_code(tmp_path):
    """python predict.py ckpt_path=<model>.onnx: no covidct module imports torch, and neither torch nor
    Lightning, torchvision, torchmetrics or covidct's PyTorch modules are loaded."""
    model = tiny_onnx(tmp_path / "m.onnx", np.array([[-4.0, 0.0, 4.0]]))
    write_sidecar(model)
    patient = ct_patient(tmp_path / "in" / "T1-001", [-900, -800, 100])
    args = [f"ckpt_path={model}", f"input={patient}", f"paths.log_dir={tmp_path / 'logs'}", "progress=false"]
    args.append("min_slices=3")  # a 3-slice phantom (the default, 5, would refuse it as no patient)
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH_PROBE, str(REPO / "predict.py"), *args],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert result["importers"] == [] and result["pytorch_modules"] == []
    written = next((tmp_path / "logs" / "predict" / "runs").iterdir())
    assert rows(written / "T1-001.csv")[0]["predicted_class"] == "COVID-19"
