"""``make bench-predict`` deployment rows: predict.py's work on the first patient(s) of the input, A vs B on
the same patient in the same run (best of ``repeats``), with the speed ratio B/A (> 1: A is faster), the largest
slice-probability difference and the patients whose call changes:

* ``onnx``: predict.py with the ONNX export (onnxruntime, CPU provider) vs with the checkpoint (PyTorch fp32);
* ``bf16``: the checkpoint under bfloat16 autocast vs fp32 (forced: on a CPU without AVX-512 BF16 or AMX,
  predict.py precision=bf16 falls back to fp32, and this row shows what emulated bf16 would cost);
* ``int8``: the int8-quantized export (calibrated on ``calibration_slices`` slices of another patient when the
  input has one) vs the fp32 export;
* ``gpu``: measured by :mod:`covidct.bench.gpu`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidct.bench.measure import best_of

if TYPE_CHECKING:
    from covidct.predict.test_sets import TestSet

log = logging.getLogger("bench_predict")

#: what :meth:`PredictTimer.run` returns: (best seconds, {patient: (float32 (N, classes) slice probabilities, call)})
Timed = tuple[float, dict]


def random_checkpoint(backbone: str, image_size: int, path: Path) -> Path:
    """A covidct checkpoint of a random-weight ``backbone`` (lung window, majority vote) at ``path``."""
    import torch

    from covidct.models.classifier import SliceClassifier

    torch.manual_seed(0)
    pre = {"windows": ["lung"], "image_size": image_size, "lung_crop": False, "vote_rule": "majority"}
    model = SliceClassifier(backbone=backbone, in_channels=1, preprocessing=pre).eval()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def compare(
    name: str, data: str, a_label: str, a: tuple[float, dict], b_label: str, b: tuple[float, dict], note: str = ""
) -> dict[str, Any]:
    """One deployment row: A vs B, each (best seconds, {patient: (slice probabilities, call)})."""
    import numpy as np

    (a_s, a_res), (b_s, b_res) = a, b
    return {
        "row": name,
        "data": data,
        "a": a_label,
        "a_s": round(a_s, 2),
        "b": b_label,
        "b_s": round(b_s, 2),
        "speed_ratio_b_over_a": round(b_s / a_s, 3),
        "max_abs_prob_diff": float(max(np.abs(a_res[p][0] - b_res[p][0]).max() for p in b_res)),
        "calls_changed": sorted(p for p in b_res if a_res[p][1] != b_res[p][1]),
        "note": note,
    }


@dataclass
class PredictTimer:
    """Times predict.py's work on ``test_set`` (best of ``repeats``, CSVs into a scratch folder) and keeps what
    each patient got; ``n_slices``: the slices of the patients last predicted."""

    test_set: TestSet
    batch_size: int
    num_workers: int
    repeats: int
    n_slices: int = 0

    def run(self, model: Any, settings: Any) -> Timed:
        """(best seconds, {patient: (slice probabilities, call)}) of ``model`` with ``settings``."""
        from covidct.predict.predictor import predict_test_set

        results: dict = {}

        def once() -> None:
            results.clear()
            with tempfile.TemporaryDirectory() as out:
                predict_test_set(
                    self.test_set, model, settings, Path(out), self.batch_size, self.num_workers, False, record=results
                )

        seconds = best_of(self.repeats, once)
        self.n_slices = sum(len(p) for p, _ in results.values())
        return seconds, dict(results)


def measure_deployment(
    input_path: str | Path,
    backbone: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    repeats: int,
    rows: list[str],
    patients: int = 1,
    ckpt_path: str | None = None,
    calibration_slices: int = 16,
    force_bf16: bool = False,
) -> list[dict[str, Any]]:
    """The deployment rows (module docstring) of ``rows`` on the first ``patients`` patient(s) of ``input_path``,
    with the checkpoint ``ckpt_path`` or, when None, random ``backbone`` weights at ``image_size``. Without
    native bfloat16 the bf16 row is skipped (predict.py would run fp32) unless ``force_bf16``."""
    import torch

    from covidct.bench.gpu import measure_gpu
    from covidct.predict.test_sets import TestSet, find_test_sets
    from covidct.predict.torch_backend import load_checkpoint

    everyone = [p for t in find_test_sets(input_path) for p in t.patients]
    test_set = TestSet("bench", everyone[:patients])
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-deploy-"))
    try:
        ckpt = Path(ckpt_path) if ckpt_path else random_checkpoint(backbone, image_size, work / "random.ckpt")
        model, settings = load_checkpoint(ckpt, torch.device("cpu"))
        backbone, image_size = model.hparams.backbone, settings.image_size
        timer = PredictTimer(test_set, batch_size, num_workers, repeats)
        weights = f"checkpoint {ckpt}" if ckpt_path else "random weights"
        fp32 = timer.run(model, settings)
        data = (
            f"{', '.join(p.name for p in test_set.patients)} ({timer.n_slices} slices), {backbone} {image_size} px, "
            f"{weights}, best of {repeats}"
        )
        out = []
        if "onnx" in rows or "int8" in rows:
            onnx_file, export_s, onnx_fp32 = onnx_export(ckpt, work, timer)
        if "onnx" in rows:
            note = f"export took {export_s:.0f} s (once)"
            out.append(
                compare(
                    "onnx", data, "predict.py onnxruntime fp32", onnx_fp32, "predict.py checkpoint fp32", fp32, note
                )
            )
        if "bf16" in rows:
            out.append(bf16_row(timer, model, settings, fp32, data, force_bf16))
        if "int8" in rows:
            others = [p for p in everyone if p not in test_set.patients]
            calibration = others[0] if others else test_set.patients[0]
            out.append(int8_row(timer, onnx_file, work, calibration, calibration_slices, onnx_fp32, fp32, data))
        if "gpu" in rows:
            out += measure_gpu(input_path, test_set, ckpt, batch_size, num_workers, repeats)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def onnx_export(ckpt: Path, work: Path, timer: PredictTimer) -> tuple[Path, float, Timed]:
    """Export ``ckpt`` to ONNX in ``work``: (the model file, seconds the export took, predict.py with it on the
    CPU provider)."""
    from covidct.predict.export import export_onnx
    from covidct.predict.onnx_backend import load_onnx
    from covidct.predict.settings import settings_from_sidecar

    start = time.perf_counter()
    files = export_onnx(ckpt, work / "model.onnx")
    export_s = time.perf_counter() - start
    export = load_onnx(files[0], "cpu")
    return files[0], export_s, timer.run(export.model, settings_from_sidecar(export.sidecar, export.mil_head))


def bf16_row(
    timer: PredictTimer, model: Any, settings: Any, fp32: Timed, data: str, force_bf16: bool
) -> dict[str, Any]:
    """The checkpoint under bfloat16 autocast vs fp32 (``fp32``); a skipped row (with why) on a CPU without
    native bfloat16 unless ``force_bf16``."""
    import torch

    from covidct.predict.torch_backend import bf16_supported

    native, what = bf16_supported(torch.device("cpu"))
    if native or force_bf16:
        note = what + ("" if native else "; predict.py precision=bf16 falls back to fp32 here, bf16 forced")
        bf16 = timer.run(model, dataclasses.replace(settings, precision="bf16", overridden={}))
        return compare("bf16", data, "checkpoint bf16 autocast", bf16, "checkpoint fp32", fp32, note)
    skipped = f"{what}: predict.py precision=bf16 runs fp32 here (bf16_force=true measures emulated bf16)"
    log.warning("bf16 row skipped: %s", skipped)
    return {"row": "bf16", "data": data, "skipped": skipped}


def int8_row(
    timer: PredictTimer,
    onnx_file: Path,
    work: Path,
    calibration: Path,
    calibration_slices: int,
    onnx_fp32: Timed,
    fp32: Timed,
    data: str,
) -> dict[str, Any]:
    """The int8 export (quantized from ``onnx_file``, calibrated on ``calibration_slices`` slices of the patient
    folder ``calibration``) vs the fp32 export (``onnx_fp32``); the note compares it with the checkpoint too."""
    from covidct.predict.export import quantize_export
    from covidct.predict.onnx_backend import load_onnx
    from covidct.predict.settings import settings_from_sidecar

    start = time.perf_counter()
    files8 = quantize_export(onnx_file, work / "model.int8.onnx", calibration, calibration_slices)
    quantize_s = time.perf_counter() - start
    export8 = load_onnx(files8[0], "cpu")
    int8 = timer.run(export8.model, settings_from_sidecar(export8.sidecar, export8.mil_head))
    note = (
        f"calibrated on {calibration_slices} slices of {calibration.name} in {quantize_s:.0f} s; vs the "
        f"checkpoint fp32: max diff {compare('', '', '', int8, '', fp32)['max_abs_prob_diff']:.3g}"
    )
    return compare("int8", data, "onnxruntime int8", int8, "onnxruntime fp32", onnx_fp32, note)


def format_deployment(rows: list[dict[str, Any]]) -> str:
    """The deployment rows as a text table."""
    from covidct.text_table import format_table

    header = ["row", "A", "A s", "B", "B s", "B/A", "max prob diff", "calls changed", "note"]
    cells = [
        [r["row"], "skipped", "", "", "", "", "", "", r["skipped"]]
        if "skipped" in r
        else [
            r["row"],
            r["a"],
            str(r.get("a_s", r.get("a_img_s"))),
            r["b"],
            str(r.get("b_s", r.get("b_img_s"))),
            f"{r.get('speed_ratio_b_over_a', r.get('ratio_a_over_b'))}x",
            f"{r['max_abs_prob_diff']:.2g}" if "max_abs_prob_diff" in r else "",
            ", ".join(r.get("calls_changed", [])) or ("none" if "calls_changed" in r else ""),
            r.get("note", ""),
        ]
        for r in rows
    ]
    return format_table(header, cells)
