"""Export a trained checkpoint for deployment without PyTorch: ONNX model + JSON sidecar (+ MIL head).

    python -m covidct.predict.export ckpt_path=<run>/checkpoints/<best>.ckpt [format=onnx] [opset=18] [output=<f.onnx>]

    python -m covidct.predict.export ckpt_path=<ckpt> quantize=int8 calibration_input=<DICOM folder>
        [calibration_slices=32]

(settings in ``conf/export.yaml``). Writes, by default into the run folder (outputs/export/runs/<time>_<id>/):

* ``<checkpoint stem>.onnx`` (``.int8.onnx`` with ``quantize=int8``): the slice model with a dynamic batch
  axis. Input ``images`` uint8 (batch, C, S, S), as the checkpoint's model takes it (the normalisation is in
  the graph); outputs ``probabilities`` float32 (batch, classes), the softmax at temperature 1, and
  ``embeddings`` float32 (batch, D), the slice features the ``mil`` vote rule reads;
* ``<model>.json``, the sidecar: windows, image size, lung crop, class names, the vote rule and its tuned
  parameters (tau, thresholds, temperature when calibrated), the model's and the source checkpoint's SHA-256,
  and the export check (the largest probability difference to PyTorch on a few chest phantom slices). The
  model holds a copy of it in its ONNX metadata (:func:`bind_sidecar`): predict refuses an edited sidecar;
* ``<model>.mil.npz`` when the checkpoint holds a fitted MIL head (plain arrays, run in numpy).

``python predict.py ckpt_path=<model>.onnx input=...`` then predicts with onnxruntime, without importing
PyTorch (:mod:`covidct.predict.onnx_backend`). ``quantize=int8``: onnxruntime static quantization (QDQ, int8 weights per
channel, uint8 activations) calibrated on slices read from ``calibration_input`` with the checkpoint's own
preprocessing. The files appear only once everything is exported and checked: a failure writes nothing.

Importing this module only defines things; torch and onnx are imported when an export runs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from covidct.cli import exit_if_keys_missing
from covidct.contracts import CONF_DIR
from covidct.errors import ConfigError, CovidCTError, DataError
from covidct.io import atomic_write_bytes, atomic_write_text
from covidct.predict.onnx_backend import (
    EMBEDDINGS,
    INPUT_NAME,
    MIL_ARRAYS,
    MODEL_SHA256,
    PROBABILITIES,
    SIDECAR_METADATA,
    SIDECAR_VERSION,
    bound_content,
    file_sha256,
    mil_path,
    open_session,
    sidecar_path,
)

if TYPE_CHECKING:
    from covidct.models.classifier import SliceClassifier
    from covidct.predict.settings import PredictorSettings

log = logging.getLogger("export")

FORMATS = ("onnx",)
QUANTIZE = ("none", "int8")
#: opsets torch's exporter writes and onnxruntime 1.20+ runs
OPSET_MIN, OPSET_MAX = 18, 23
#: the largest slice-probability difference an fp32 export may show against PyTorch on the check slices
FP32_TOLERANCE = 1e-4


def check_settings(
    format: str, opset: Any, quantize: str, calibration_input: Any, calibration_slices: Any, output: Any
) -> None:
    """Fail before the checkpoint is read, naming the key, on a bad value."""
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: only onnx is supported (python -m covidct.predict.export format=onnx)")
    if not isinstance(opset, int) or isinstance(opset, bool) or not OPSET_MIN <= opset <= OPSET_MAX:
        raise ConfigError(f"opset={opset!r}: use a whole number from {OPSET_MIN} to {OPSET_MAX} (default 18)")
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: use none or int8")
    if quantize == "int8" and not calibration_input:
        raise ConfigError(
            "quantize=int8 needs calibration_input=<DICOM folder>: a patient folder or a folder of patient folders "
            "whose slices set the int8 ranges"
        )
    n = calibration_slices
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"calibration_slices={n!r}: use a whole number >= 1")
    if output is not None and Path(str(output)).suffix != ".onnx":
        raise ConfigError(f"output={output}: the model file must end in .onnx (its sidecar gets .onnx.json)")


def read_slices(input_path: str | Path, settings: PredictorSettings, n: int, key: str) -> np.ndarray:
    """Up to ``n`` uint8 (C, S, S) slices from the DICOM patients under ``input_path``, preprocessed as the
    checkpoint's model expects: evenly spaced through each patient, the same number from each."""
    from covidct.data.preprocess import SlicePreprocessor, parse_windows
    from covidct.predict.test_sets import find_test_sets, read_patient

    try:
        patients = [p for t in find_test_sets(input_path) for p in t.patients]
    except DataError as exc:
        raise DataError(f"{key}: {exc}") from None
    pre = SlicePreprocessor(parse_windows(settings.windows), settings.image_size, settings.lung_crop)
    per_patient = max(1, -(-n // len(patients)))
    chosen = []
    for folder in patients:
        item = read_patient(folder, pre)
        if "error" in item:
            log.warning("%s: %s: %s (not used)", key, folder, item["error"])
            continue
        images = item["images"]
        take = np.unique(np.linspace(0, len(images) - 1, min(per_patient, len(images))).round().astype(int))
        chosen.append(images[take])
        if sum(len(c) for c in chosen) >= n:
            break
    if not chosen:
        raise DataError(f"{key}={input_path}: no patient folder with a readable slice in it.")
    return np.concatenate(chosen)[:n]


def phantom_slices(settings: PredictorSettings, n: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 (C, S, S) chest-like slices, preprocessed as the model expects (its windows and size): a soft
    tissue body (40 HU) with two lungs (-850 HU) in air, of varied size and position, with 20 HU noise. The export
    is checked on them: unlike uniform noise, they keep a CT model's activations in their usual range (noise
    drives the logits of a model trained on CT to hundreds, where float32 rounding shows in the probabilities)."""
    from covidct.data.preprocess import SlicePreprocessor, parse_windows

    pre = SlicePreprocessor(parse_windows(settings.windows), settings.image_size, False)
    rng = np.random.default_rng(seed)
    size = 256
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    slices = []
    for _ in range(n):
        a, b, shift = rng.uniform(0.75, 0.95), rng.uniform(0.5, 0.7), rng.uniform(-0.05, 0.05, 2)
        x, y = xx - shift[0], yy - shift[1]
        hu = np.full((size, size), -1000.0)
        hu[(x / a) ** 2 + (y / b) ** 2 <= 1] = 40.0
        lung_a, lung_b = a * rng.uniform(0.3, 0.4), b * rng.uniform(0.6, 0.8)
        for side in (-1, 1):
            hu[((x - side * a * 0.45) / lung_a) ** 2 + (y / lung_b) ** 2 <= 1] = -850.0
        slices.append(pre((hu + rng.normal(0.0, 20.0, hu.shape)).astype(np.float32)))
    return np.stack(slices)


def wrap(model: SliceClassifier) -> Any:
    """``images`` uint8 (B, C, H, W) -> (softmax probabilities (B, classes), embeddings (B, D)), float32."""
    import torch

    class ProbabilitiesAndEmbeddings(torch.nn.Module):
        def __init__(self, net: SliceClassifier) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, features = self.net.forward_with_features(images)
            return logits.float().softmax(dim=1), features.float()

    return ProbabilitiesAndEmbeddings(model).eval()


def torch_onnx_export(model: SliceClassifier, settings: PredictorSettings, path: Path, opset: int) -> None:
    """Write ``model`` (with :func:`wrap`) as ONNX to ``path`` with a dynamic batch axis (torch's exporter)."""
    import torch

    example = torch.zeros(2, len(settings.windows), settings.image_size, settings.image_size, dtype=torch.uint8)
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:  # the exporter's optimiser logs every pass at INFO
        logger.setLevel(logging.WARNING)
    try:
        _export(model, example, path, opset)
    finally:
        for logger, level in zip(chatty, levels, strict=True):
            logger.setLevel(level)


def _export(model: SliceClassifier, example: Any, path: Path, opset: int) -> None:
    import contextlib

    import torch

    with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            wrap(model),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[PROBABILITIES, EMBEDDINGS],
            opset_version=opset,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def torch_outputs(model: SliceClassifier, images: np.ndarray) -> np.ndarray:
    """float32 (N, classes) PyTorch probabilities of uint8 (N, C, S, S) ``images``."""
    from covidct.predict.torch_backend import slice_probabilities

    return slice_probabilities(model, images, batch_size=32)


def quantize_int8(fp32: Path, out: Path, images: np.ndarray, work: Path, batch_size: int = 8) -> None:
    """onnxruntime static quantization of ``fp32`` into ``out``: QDQ, per-channel int8 weights, uint8
    activations, MinMax ranges from ``images`` (uint8 (N, C, S, S))."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Slices(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: images[i : i + batch_size]} for i in range(0, len(images), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = work / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out),
        Slices(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        extra_options={"CalibTensorRangeSymmetric": False},
    )


def mil_arrays(settings: PredictorSettings) -> tuple[dict[str, Any], bytes] | None:
    """(the head's constructor arguments, its ``.npz`` bytes) when the checkpoint holds a fitted MIL head."""
    head = settings.mil_head
    if head is None:
        return None
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in head.state_dict().items()}
    buf = io.BytesIO()
    np.savez(buf, **{name: state[name] for name in MIL_ARRAYS})
    return dict(head.init_args), buf.getvalue()


def export_onnx(
    ckpt_path: str | Path,
    output: str | Path,
    opset: int = 18,
    quantize: str = "none",
    calibration_input: str | Path | None = None,
    calibration_slices: int = 32,
    check_slices: int = 4,
) -> list[Path]:
    """Export ``ckpt_path`` to ``output`` (``.onnx``) with its sidecar (and MIL head); returns the files written
    (the model first, the sidecar last).

    ``ckpt_path`` is a checkpoint, or an fp32 export (``.onnx``) to quantize (``quantize=int8``, no PyTorch
    needed). Nothing is written unless the export passes its check: an fp32 export's probabilities on
    ``check_slices`` chest phantom slices (:func:`phantom_slices`) must be within :data:`FP32_TOLERANCE` of
    PyTorch's. ``quantize=int8`` exports fp32, then quantizes it with
    :func:`quantize_export` (its difference to the fp32 export is recorded, not bounded).
    """
    from covidct.predict.onnx_backend import looks_like_onnx

    check_settings("onnx", opset, quantize, calibration_input, calibration_slices, output)
    ckpt_path, output = Path(ckpt_path), Path(output)
    if ckpt_path.is_file() and looks_like_onnx(ckpt_path):
        if quantize != "int8":
            raise ConfigError(
                f"ckpt_path={ckpt_path} is already an ONNX export; give its checkpoint, or quantize it with "
                "quantize=int8 calibration_input=<DICOM folder>"
            )
        return quantize_export(ckpt_path, output, calibration_input, calibration_slices)
    if quantize == "none":
        return export_checkpoint(ckpt_path, output, opset, check_slices)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        fp32 = export_checkpoint(ckpt_path, Path(tmp) / "fp32.onnx", opset, check_slices)[0]
        return quantize_export(fp32, output, calibration_input, calibration_slices)


def export_checkpoint(ckpt_path: Path, output: Path, opset: int, check_slices: int) -> list[Path]:
    """The fp32 export of a checkpoint (see :func:`export_onnx`)."""
    import onnx
    import onnxruntime
    import torch

    from covidct.predict.torch_backend import load_checkpoint

    model, settings = load_checkpoint(ckpt_path, torch.device("cpu"))
    check = phantom_slices(settings, check_slices)
    shape = check.shape
    expected = torch_outputs(model, check)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        log.info("exporting %s (%s, %d px) to ONNX opset %d ...", ckpt_path, model.hparams.backbone, shape[-1], opset)
        torch_onnx_export(model, settings, fp32, opset)
        session = open_session(fp32, ["CPUExecutionProvider"], str(fp32))
        diff = float(np.abs(session.run([PROBABILITIES], {INPUT_NAME: check})[0] - expected).max())
        if diff > FP32_TOLERANCE:
            raise DataError(
                f"ckpt_path={ckpt_path}: the ONNX export's slice probabilities differ from PyTorch's by up to "
                f"{diff:.2g} (> {FP32_TOLERANCE:g}) on {len(check)} slices; nothing was written. Try another "
                f"opset (opset={opset} now) or report the backbone ({model.hparams.backbone})."
            )
        mil = mil_arrays(settings)
        sidecar = {
            "covidct_onnx": SIDECAR_VERSION,
            "model_file": output.name,
            "precision": "fp32",
            "format": "onnx",
            "opset": opset,
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", *shape[1:]]},
            "outputs": {
                PROBABILITIES: "float32 (batch, classes), softmax at temperature 1",
                EMBEDDINGS: "float32 (batch, D)",
            },
            "backbone": model.hparams.backbone,
            "windows": settings.windows,
            "image_size": settings.image_size,
            "lung_crop": settings.lung_crop,
            "class_names": settings.class_names,
            "vote": settings.vote.to_sidecar(),
            "mil": None if mil is None else {"file": mil_path(output).name, "init": mil[0]},
            "source_checkpoint": str(ckpt_path.resolve()),
            "source_checkpoint_sha256": file_sha256(ckpt_path),
            "export_check": {"against": "PyTorch", "phantom_slices": len(check), "max_abs_prob_diff": diff},
            "calibration": None,
            "exported_with": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        }
        return write_export(fp32, output, sidecar, None if mil is None else mil[1])


def write_export(model: Path, output: Path, sidecar: dict[str, Any], mil: bytes | None) -> list[Path]:
    """Move ``model`` (a file beside ``output``) to ``output`` holding its sidecar (:func:`bind_sidecar`), write
    the MIL head and then the sidecar (last: a model without its sidecar is refused by predict, never misread)."""
    import hashlib

    written = [output]
    if mil is not None:
        sidecar["mil"] = dict(sidecar["mil"], file=mil_path(output).name, sha256=hashlib.sha256(mil).hexdigest())
        written.append(atomic_write_bytes(mil_path(output), mil))
    sidecar = bind_sidecar(model, sidecar)
    os.replace(model, output)
    written.append(atomic_write_text(sidecar_path(output), json.dumps(sidecar, indent=1) + "\n"))
    return written


def bind_sidecar(model: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Write ``sidecar`` (all but the model's SHA-256) into the ONNX metadata of ``model`` (key
    :data:`SIDECAR_METADATA`, replacing an older copy) and return it, as plain JSON types, with the SHA-256 of
    the model so written: :func:`~.onnx_backend.load_onnx` refuses a sidecar that differs from the copy."""
    import onnx

    plain = {k: v for k, v in _plain(sidecar).items() if k != MODEL_SHA256}
    proto = onnx.load(str(model))
    props = {p.key: p.value for p in proto.metadata_props} | {SIDECAR_METADATA: bound_content(plain)}
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(model))
    return plain | {MODEL_SHA256: file_sha256(model)}


def quantize_export(
    model_path: str | Path, output: str | Path, calibration_input: str | Path, calibration_slices: int = 32
) -> list[Path]:
    """int8 export ``output`` of the fp32 export ``model_path`` (onnxruntime static quantization, see
    :func:`quantize_int8`), calibrated on ``calibration_slices`` slices of ``calibration_input`` read with the
    export's preprocessing; the sidecar records the largest slice-probability difference to the fp32 export
    on those slices. Uses onnxruntime only (no PyTorch)."""
    from covidct.predict.onnx_backend import load_onnx
    from covidct.predict.settings import settings_from_sidecar

    model_path, output = Path(model_path), Path(output)
    export = load_onnx(model_path, "cpu")
    if export.sidecar["precision"] != "fp32":
        raise ConfigError(f"ckpt_path={model_path}: already {export.sidecar['precision']}; quantize its fp32 export")
    settings = settings_from_sidecar(export.sidecar, None)
    calibration = read_slices(calibration_input, settings, calibration_slices, "calibration_input")
    expected = export.model.probabilities(calibration)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        int8 = Path(tmp) / "int8.onnx"
        log.info("quantizing to int8, calibrated on %d slices of %s ...", len(calibration), calibration_input)
        quantize_int8(model_path, int8, calibration, Path(tmp))
        got = open_session(int8, ["CPUExecutionProvider"], str(int8)).run([PROBABILITIES], {INPUT_NAME: calibration})
        diff = float(np.abs(got[0] - expected).max())
        log.info("int8: largest slice-probability difference to fp32 on %d slices: %.4g", len(calibration), diff)
        fp32_check = export.sidecar.get("export_check") or {}
        sidecar = dict(export.sidecar) | {
            "model_file": output.name,
            "precision": "int8",
            "export_check": {
                "against": "the fp32 export, on the calibration slices",
                "slices": len(calibration),
                "max_abs_prob_diff": diff,
                "fp32_against_pytorch": fp32_check.get("max_abs_prob_diff"),
            },
            "calibration": {
                "input": str(Path(calibration_input).resolve()),
                "slices": len(calibration),
                "method": "MinMax",
                "format": "QDQ, int8 weights per channel, uint8 activations",
            },
            "quantized_from": {"file": str(model_path.resolve()), "sha256": export.sidecar["model_sha256"]},
        }
        mil = mil_path(model_path).read_bytes() if export.sidecar["mil"] else None
        return write_export(int8, output, sidecar, mil)


def _plain(value: Any) -> Any:
    """OmegaConf containers (windows from a checkpoint may be any) -> plain JSON types."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def default_output(cfg: DictConfig) -> Path:
    """``<run dir>/<checkpoint stem>.onnx`` (``.int8.onnx`` when quantized) unless ``output`` is set."""
    if cfg.get("output"):
        return Path(cfg.output)
    suffix = ".int8.onnx" if cfg.quantize == "int8" else ".onnx"
    return Path(cfg.paths.output_dir) / (Path(cfg.ckpt_path).stem + suffix)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def export_app(cfg: DictConfig) -> None:
    exit_if_keys_missing(cfg, "export", log)
    try:
        check_settings(
            cfg.format, cfg.opset, cfg.quantize, cfg.calibration_input, cfg.calibration_slices, cfg.get("output")
        )
        written = export_onnx(
            cfg.ckpt_path,
            default_output(cfg),
            cfg.opset,
            cfg.quantize,
            cfg.calibration_input,
            cfg.calibration_slices,
            cfg.check_slices,
        )
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message names the key or file; no traceback for user errors)
    for path in written:
        log.info("wrote %s", path)
    log.info("predict with it: python predict.py ckpt_path=%s input=<DICOM folder>", written[0])


def main() -> None:
    """``python -m covidct.predict.export ckpt_path=<checkpoint> [key=value ...]``: process setup, then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    export_app()


if __name__ == "__main__":
    from covidct.cli import exit_on_typo

    exit_on_typo("export")
    main()
