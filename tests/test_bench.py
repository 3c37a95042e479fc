"""The benchmark's code paths on tiny sizes (every row, bench.json), its command lines' one-line errors, and
imports that only define things. No timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
from hydra import compose, initialize_config_dir

from covidct.bench.framework import run_bench
from covidct.config import register_resolvers
from covidct.data.synthetic import SyntheticSpec, ensure_dataset
from covidct.errors import ConfigError
from tests.conftest import REPO, cli_env, run_cli


@pytest.mark.slow
def test_every_row_runs_on_tiny_data_and_lands_in_bench_json(tmp_path):
    # a tiny stand-in for the real sample, so its rows (loader, cache build, inference) run too
    stand_in = ensure_dataset(
        tmp_path / "stand-in", SyntheticSpec(patients_per_class=(1, 1, 1), slices_min=6, slices_max=6, image_size=96)
    )
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(
            "bench",
            overrides=[
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"bench.real_sample={stand_in}",
                "bench.data.patients_per_class=2",
                "bench.data.slices=6",
                "bench.image_size=64",
                "bench.loader.num_workers=0",
                "bench.cache_build.workers=2",
                "bench.cache_lung_crop.repeats=1",
                "bench.framework.epochs=1",
                "bench.framework.repeats=1",
                "bench.framework.image_size=32",
                "bench.precision.repeats=1",
                "bench.precision.image_size=32",
                "bench.memory.patients_per_class=2",
                "bench.memory.slices=6",
                "bench.memory.image_size=64",
                "bench.memory.batches=1",
                "bench.inference.backbone=resnet18",
                "bench.inference.image_size=64",
                "bench.inference.num_workers=0",
                "bench.inference.patients=2",
            ],
        )
    rows = run_bench(cfg.bench, tmp_path / "out")
    names = [(r.name, r.b_label) for r in rows]
    assert names == [
        ("loader", "DICOM every epoch"),
        ("loader", "JPEG files (paper)"),
        ("cache build", "raw pydicom decode"),
        ("cache build", "1 process"),
        ("loader", "DICOM every epoch"),
        ("cache build", "raw pydicom decode"),
        ("cache build", "1 process"),
        ("cache lung crop", "lung_crop=false"),
        ("framework", "hand-written loop"),
        ("precision", "32-true"),
        ("memory", "peak RSS N"),
        ("inference", "bare forward"),
    ]
    assert all(r.a > 0 and r.b > 0 and math.isfinite(r.ratio) for r in rows)
    assert "36 slices" in rows[0].data and "18 slices" in rows[4].data  # 2 x 3 x 6 synthetic, 3 x 6 stand-in
    assert "36 vs 360 slices" in rows[10].data  # N vs 10N
    assert "2 patients, 12 slices" in rows[11].data
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(report["rows"]) == len(rows) and report["environment"]["cpus"] >= 1
    assert report["rows"][0]["ratio"] == pytest.approx(rows[0].ratio)
    check_precision_figures(rows[9], report["precision"])


def check_precision_figures(row, figures: dict) -> None:
    """The precision row: both arms timed, its ratio their recorded seconds', each arm's validation figures (which
    differ: the arms really ran in different precisions), in its words, and ``ok`` = bf16 faster and the arms agree."""
    from covidct.bench.training import BF16, FP32, metrics_agree
    from covidct.hardware import cpu_bf16

    (bf16_s,), (fp32_s,) = figures["seconds"][BF16], figures["seconds"][FP32]
    assert (row.a_label, row.b_label, row.unit, row.target) == (BF16, FP32, "ms/slice", "< 1.00x")
    assert row.ratio == pytest.approx(bf16_s / fp32_s) == pytest.approx(figures["ratio"])
    assert row.b == pytest.approx(fp32_s / figures["slices_per_run"] * 1000)
    fp32, bf16 = figures["metrics"][FP32], figures["metrics"][BF16]
    for m in (fp32, bf16):
        assert set(m) == {"loss", "slice_acc", "auroc_macro"} and m["loss"] > 0 and 0 <= m["slice_acc"] <= 1
        assert f"{m['slice_acc']:.3f}" in row.data and f"{m['loss']:.3f}" in row.data
    assert bf16["loss"] != fp32["loss"]
    assert 0 <= figures["same_calls"] <= 1 and f"same slice calls {figures['same_calls']:.3f}" in row.data
    assert figures["metrics_agree"] == metrics_agree(fp32, bf16, figures["same_calls"], 0.05)
    assert row.ok == figures["passed"] == (bf16_s < fp32_s and figures["metrics_agree"])
    native = cpu_bf16()[0]
    assert figures["native_bf16"] == native and figures["trainer_cpu_precision"] == (BF16 if native else FP32)
    assert ("no native bf16 on this CPU: trainer=cpu keeps 32-true" in row.data) == (not native)


@pytest.mark.slow
def test_rows_selects_rows_and_names_unknown_ones(tmp_path):
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        overrides = [
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"bench.real_sample={tmp_path / 'absent'}",
            "bench.data.patients_per_class=2",
            "bench.data.slices=5",  # data.min_slices: fewer is no patient
            "bench.image_size=32",
            "bench.framework.epochs=1",
            "bench.framework.repeats=1",
            "bench.framework.image_size=32",
        ]
        cfg = compose("bench", overrides=[*overrides, "bench.rows=[framework]"])
        bad = compose("bench", overrides=[*overrides, "bench.rows=[framwork]"])
    rows = run_bench(cfg.bench, tmp_path / "out")
    assert [r.name for r in rows] == ["framework"] and "median of 1 pairs" in rows[0].data
    with pytest.raises(ConfigError, match=r"bench.rows.*'framwork'"):
        run_bench(bad.bench, tmp_path / "out2")


@pytest.mark.slow
def test_growth_row_runs_every_stage_at_three_sizes_and_computes_its_ratios_from_the_recorded_times(tmp_path):
    """bench.rows=[growth] at the tiniest size, in this process: every stage at 1x, 2x and 4x the patients with
    positive times and peak RSS, seconds per patient and the 4x/1x ratio as defined (checked from the recorded
    seconds and patients), in bench.json, the rows and the printed table (NO where over the target). No timing
    is asserted."""
    from covidct.bench.growth import FACTORS, STAGES, TARGET

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(
            "bench",
            overrides=[
                f"paths.cache_dir={tmp_path / 'cache'}",
                "bench.rows=[growth]",
                "bench.growth.base_patients_per_class=2",
                "bench.growth.slices=6",
                "bench.growth.image_size=32",
                "bench.growth.input_size=32",
                "bench.growth.warm_up=false",
            ],
        )
    extra: dict = {}
    rows = run_bench(cfg.bench, tmp_path / "out", extra)
    assert FACTORS == (1, 2, 4) and [r.name for r in rows] == [f"growth {s}" for s in STAGES]
    growth = json.loads((tmp_path / "out" / "bench.json").read_text())["growth"]
    assert growth["factors"] == [1, 2, 4] and growth["base_patients_per_class"] == [2, 2, 2]
    assert (growth["repeats"], growth["threads"], growth["target"]) == (1, 1, TARGET)
    stages = {g["stage"]: g for g in growth["stages"]}
    assert list(stages) == list(STAGES)
    for name, g in stages.items():
        assert g["per"] == STAGES[name][0]
        for key in ("patients", "slices", "seconds", "peak_rss_mib", "s_per_patient"):
            assert len(g[key]) == 3, (name, key)
        assert all(s > 0 for s in g["seconds"]) and all(r > 0 for r in g["peak_rss_mib"]), name
        assert g["slices"] == [6 * p for p in g["patients"]], name  # every slice kept (data.min_slices 5)
        per = [s / p for s, p in zip(g["seconds"], g["patients"], strict=True)]
        assert g["s_per_patient"] == pytest.approx(per, rel=1e-12), name
        assert g["ratio"] == pytest.approx(per[2] / per[0], rel=1e-12) and g["ok"] == (g["ratio"] <= TARGET), name
    for name in ("generate", "cache", "predict"):
        assert stages[name]["patients"] == [6, 12, 24], name
    for i in range(3):  # the split: training + validation patients are all of them, at every size
        assert stages["train_epoch"]["patients"][i] + stages["validate"]["patients"][i] == 6 * 2**i
    assert stages["vote"]["patients"] == stages["validate"]["patients"] == stages["report"]["patients"]
    for row, g in zip(rows, stages.values(), strict=True):
        assert row.ratio == pytest.approx(g["ratio"]) and row.ok == g["ok"] and row.target == f"<= {TARGET}x"
    lines = extra["growth_table"].splitlines()
    assert len(lines) == 1 + len(STAGES)
    for line, g in zip(lines[1:], stages.values(), strict=True):
        cells = line.split()
        assert cells[0] == g["stage"] and f"{g['ratio']:.3g}x" in cells and ("NO" in cells) == (not g["ok"])


def test_growth_table_flags_a_stage_over_the_target():
    from covidct.bench.growth import StageGrowth, format_growth

    linear = StageGrowth("cache", "all", "", [3, 6, 12], [30, 60, 120], [1.0, 2.0, 4.0], [900.0, 910.0, 930.0])
    square = StageGrowth("vote", "val", "", [2, 4, 8], [20, 40, 80], [1.0, 4.0, 16.0], [900.0, 900.0, 901.0])
    assert linear.s_per_patient == [1 / 3, 1 / 3, 1 / 3] and linear.ratio == pytest.approx(1.0) and linear.ok
    assert square.s_per_patient == [0.5, 1.0, 2.0] and square.ratio == 4.0 and not square.ok
    table = format_growth([linear, square]).splitlines()
    assert table[1].split()[0] == "cache" and "yes" in table[1].split() and "900/910/930" in table[1]
    assert table[2].split()[0] == "vote" and "4x" in table[2].split() and "NO" in table[2].split()
    assert "peak RSS MiB" in table[0] and "4x/1x" in table[0]


def test_precision_row_fails_when_the_metrics_disagree_even_if_bf16_is_faster():
    from covidct.bench.training import metrics_agree, precision_note, precision_passes

    fp32 = {"loss": 0.52, "slice_acc": 0.81, "auroc_macro": 0.90}
    close = {"loss": 0.53, "slice_acc": 0.80, "auroc_macro": 0.80}  # AUROC and loss are reported, not compared
    assert metrics_agree(fp32, close, 0.97, 0.05) and precision_passes(0.8, metrics_agree(fp32, close, 0.97, 0.05))
    assert not precision_passes(1.0, True)  # as fast is not faster
    assert not metrics_agree(fp32, close | {"slice_acc": 0.70}, 0.97, 0.05)
    assert not metrics_agree(fp32, close, 0.90, 0.05)  # one slice in ten called otherwise
    assert not precision_passes(0.5, metrics_agree(fp32, close, 0.90, 0.05))
    note = precision_note(fp32, close | {"slice_acc": 0.70}, 0.9, 0.05, False, native=False)
    assert "acc 0.810 vs 0.700 (-0.110)" in note and "loss 0.520 vs 0.530 (+0.010)" in note and "DISAGREE" in note
    assert "same slice calls 0.900" in note
    assert "no native bf16 on this CPU: trainer=cpu keeps 32-true" in note


def test_macro_auroc_averages_only_the_classes_with_positive_and_negative_validation_slices():
    import torch

    from covidct.bench.training import slice_metrics

    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    logged = {"val/loss": 0.4, "val/slice_acc": 0.75}
    both = slice_metrics(probs, torch.tensor([0, 0, 1, 1, -1]), logged)  # class 2: no slice, slice 5: unknown
    assert both == {"loss": 0.4, "slice_acc": 0.75, "auroc_macro": 1.0}  # torchmetrics alone: (1 + 1 + 0) / 3
    assert math.isnan(slice_metrics(probs, torch.tensor([0, 0, 0, -1, -1]), logged)["auroc_macro"])


IMPORT_PROBE = textwrap.dedent("""
    import json, logging, os, sys, warnings
    import covidct  # the package's own import is not the bench's doing
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    def state():
        return {"environ": dict(os.environ), "root_logger": [logging.root.level, len(logging.root.handlers)],
                "warning_filters": len(warnings.filters), "resolvers": OmegaConf.has_resolver("run_suffix"),
                "config_store": sorted(ConfigStore.instance().repo)}

    before, modules = state(), set(sys.modules)
    import covidct.bench.framework, covidct.bench.predict  # and the row modules they import when run:
    import covidct.bench.deployment, covidct.bench.gpu, covidct.bench.loading, covidct.bench.training
    import covidct.bench.growth
    after = state()
    changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
    if "environ" in changed:
        changed["environ"] = sorted(set(after["environ"].items()) ^ set(before["environ"].items()))
    heavy = ("torch", "albumentations", "pytorch_lightning", "torchvision", "cv2", "pydicom", "numpy")
    print(json.dumps({"changed": changed, "heavy": sorted(m for m in set(sys.modules) - modules if m in heavy)}))
""")


def test_importing_the_bench_modules_only_defines_things():
    """In a fresh process without NO_ALBUMENTATIONS_UPDATE: importing covidct.bench.framework and covidct.bench.predict
    (and the modules of their rows) leaves the environment, logging, warning filters, OmegaConf resolvers and
    Hydra's ConfigStore as they were and imports none of the libraries the rows use (before: the variable was set,
    resolvers and the train schema registered, and torch, Lightning and albumentations imported, 4000 modules)."""
    env = {k: v for k, v in cli_env().items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"changed": {}, "heavy": []}


@pytest.mark.parametrize(  # python -m <module>, run in this process
    ("module", "args", "key"),
    [
        ("covidct.bench", ["bench.rows=[framwork]"], "bench.rows has unknown rows ['framwork']"),
        ("covidct.bench", ["bench.framework.backbone=vgg61"], "bench.framework.backbone='vgg61' is not known"),
        (
            "covidct.bench",
            ["bench.rows=[precision]", "bench.precision.metric_tolerance=-1"],
            "bench.precision.metric_tolerance=-1 must be a number >= 0",
        ),
        ("covidct.bench", ["bench.rows=[growth]", "bench.growth.slices=3"], "bench.growth.slices=3 must be"),
        ("covidct.bench.predict", ["input=.", "backbone=vgg61"], "backbone='vgg61' is not known"),
        ("covidct.bench.predict", [], "input not set"),
    ],
)
def test_a_bad_value_ends_in_one_line_naming_the_key(tmp_path, module, args, key):
    out = run_cli(
        [*args, f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path, f"-m {module}"
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and key in lines[0] and "ERROR" in lines[0], out.stderr
    assert not (tmp_path / "cache").exists()  # it failed before making any data


@pytest.mark.slow
def test_deployment_rows_compare_bf16_with_fp32_on_the_same_patient_and_skip_gpu_rows_without_one(tmp_path, caplog):
    """bench_predict's deployment rows on a tiny stand-in (resnet18, 32 px): the bf16 row is measured, its largest
    slice-probability difference is not zero, the calls are compared; the gpu rows are skipped with a message on a
    machine without a CUDA GPU. (The onnx and int8 rows export a model, which takes long: tests/test_export.py
    tests the export and the quantization, and ``make bench-predict`` runs the rows.)"""
    import torch

    from covidct.bench.deployment import format_deployment, measure_deployment

    stand_in = ensure_dataset(
        tmp_path / "stand-in", SyntheticSpec(patients_per_class=(1, 0, 0), slices_min=5, slices_max=5, image_size=64)
    )
    with caplog.at_level("WARNING"):
        rows = measure_deployment(stand_in, "resnet18", 32, 8, 0, 1, ["bf16", "gpu"], 1, None, 4, force_bf16=True)
    assert rows[0]["row"] == "bf16" and rows[0]["a_s"] > 0 and rows[0]["b_s"] > 0
    assert 0 < rows[0]["max_abs_prob_diff"] < 0.1 and set(rows[0]["calls_changed"]) <= {"P001"}
    assert "(5 slices), resnet18 32 px, random weights" in rows[0]["data"]
    if not torch.cuda.is_available():
        assert "gpu rows skipped" in caplog.text and [r["row"] for r in rows] == ["bf16"]
    assert "checkpoint bf16 autocast" in format_deployment(rows)
