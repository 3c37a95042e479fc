"""The command line of the entry points: a missing mandatory key ends in one usage line and no run
folder (covidct/cli.py), ``--help`` of train.py and predict.py (conf/hydra/help/), and predict.py's
``vote.*`` overrides. Each subprocess costs a Python start and one Hydra composition (a few seconds),
no training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from covidct.cli import MandatoryKeysCheck, missing_keys, usage_error
from covidct.config import register_resolvers
from tests.conftest import REPO, cli_env, run_cli


@pytest.mark.slow  # a few seconds: keeps make test-fast under 2 min
def test_predict_without_its_keys_prints_a_usage_line_and_makes_no_run_folder(tmp_path):
    out = run_cli([], tmp_path, script="predict.py")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ckpt_path and input not set: python predict.py ckpt_path=" in lines[0], out.stderr
    assert "[predict][ERROR]" in lines[0] and "--help" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no outputs/predict/runs/<time>_... left behind

    # a multirun: keys set by the sweep count as set; one still missing stops it before the sweep folder
    out = run_cli(["-m", "input=a,b", "device='cpu'"], tmp_path, script="predict.py")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "[predict][ERROR] - ckpt_path not set: " in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []


def test_other_entry_points_print_their_usage_line_too(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "covidct.predict.evaluate", "bootstrap=0"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "predictions and labels not set: python -m covidct.predict.evaluate predictions=<" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # ~4 s: Hydra composes the whole config for the help
def test_predict_help_lists_its_own_keys_not_the_training_groups(tmp_path):
    out = run_cli(["--help"], tmp_path, script="predict.py")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    text = out.stdout
    assert text.startswith("python predict.py ckpt_path=<checkpoint> input=<folder>")
    assert "tau               null: the checkpoint's tuned share" in text
    assert "vote=<rule>       the checkpoint's rule if not given (vote: null)" in text
    for training_group in ("model:", "trainer:", "experiment:", "optimizer:", "loss:", "Configuration groups"):
        assert training_group not in text, training_group
    assert "ckpt_path: ???" in text  # the composed config, with the command line's overrides
    assert list(tmp_path.iterdir()) == []


def test_predict_help_names_every_key_and_vote_rule():
    """conf/hydra/help/predict.yaml is written by hand: it must follow conf/predict.yaml."""
    help_text = yaml.safe_load((REPO / "conf" / "hydra" / "help" / "predict.yaml").read_text())["header"]
    keys = set(yaml.safe_load((REPO / "conf" / "predict.yaml").read_text())) - {"defaults", "task_name"}
    assert keys and not [key for key in keys if key not in help_text]
    assert not [key for key in ("vote.k", "vote.center_slices", "vote.window_slices") if key not in help_text]
    rules = [p.stem for p in (REPO / "conf" / "vote").glob("*.yaml")]
    assert rules and not [rule for rule in rules if rule not in help_text]


@pytest.mark.slow  # ~4 s: Hydra composes the whole config for the help
def test_train_help_shows_examples_outputs_nulls_groups_and_config(tmp_path):
    out = run_cli(["--help"], tmp_path, script="train.py")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    text = out.stdout
    assert "Train a CT slice classifier" in text.splitlines()[2]
    for example in ("python train.py loss.gamma=2 model=vgg16", "python train.py -m loss.gamma=0,1,2"):
        assert example in text
    assert "outputs/train/runs/<time>_<suffix>/" in text and "report.html" in text and "metrics.json" in text
    assert "vote.tau, vote.slice_threshold   tuned on the validation patients" in text
    assert "model: efficientnet_b0, efficientnet_b5, resnet18" in text  # Hydra's $APP_CONFIG_GROUPS
    assert "  backbone: resnet18\n" in text  # Hydra's $CONFIG
    assert list(tmp_path.iterdir()) == []


def test_predict_composes_vote_overrides_without_a_rule(tmp_path):
    out = run_cli(["vote.k=3", "--cfg", "job"], tmp_path, script="predict.py")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    vote = yaml.safe_load(out.stdout)["vote"]
    assert vote == {"rule": None, "k": 3, "center_slices": None, "window_slices": None}  # None: the checkpoint's
    assert list(tmp_path.iterdir()) == []


def test_predict_vote_group_merges_over_the_nulls():
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cases = {
            (): (None, None, None, None),
            ("vote.center_slices=30",): (None, None, 30, None),
            ("vote=topk_mean",): ("topk_mean", 5, None, None),
            ("vote=topk_mean", "vote.k=3"): ("topk_mean", 3, None, None),
            ("vote=weighted_center",): ("weighted_center", None, 40, 80),
            ("vote=majority",): ("majority", None, None, None),
        }
        for overrides, expected in cases.items():
            vote = compose("predict", overrides=list(overrides)).vote
            assert (vote.rule, vote.k, vote.center_slices, vote.window_slices) == expected, overrides


def test_mandatory_keys_of_every_entry_point_have_a_usage_line():
    """What the callback finds in each composed config (``hydra.*`` left out), and a usage line for each."""
    register_resolvers()  # train_schema, ${run_suffix:}
    expected = {
        "train": [],
        "predict": ["ckpt_path", "input"],
        "evaluate": ["predictions", "labels"],
        "pseudo_label": ["ckpt_path", "input"],
        "bench": [],
        "bench_predict": ["input"],
        "export": ["ckpt_path"],
    }
    assert sorted(p.stem for p in (REPO / "conf").glob("*.yaml")) == sorted(expected)
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        for name, keys in expected.items():
            cfg = compose(name, return_hydra_config=True)
            assert missing_keys(cfg) == keys, name
            if keys:
                assert usage_error(name, keys).startswith(f"{' and '.join(keys)} not set: python ")
            else:
                MandatoryKeysCheck().on_run_start(config=cfg, config_name=name)  # nothing missing: no exit


@pytest.mark.slow  # imports each entry point's libraries
@pytest.mark.parametrize(
    ("script", "line"),
    [
        ("predict.py", "ckpt_path and input not set: python predict.py ckpt_path=<run>/checkpoints/<best>.ckpt"),
        ("-m covidct.predict.evaluate", "predictions and labels not set: python -m covidct.predict.evaluate"),
        ("-m covidct.predict.export", "ckpt_path not set: python -m covidct.predict.export ckpt_path=<run>/"),
        ("-m covidct.training.pseudo_label", "ckpt_path and input not set: python -m covidct.training.pseudo_label"),
        ("-m covidct.bench.predict", "input not set: python -m covidct.bench.predict input=<patient folder"),
    ],
)
def test_with_the_callback_off_each_entry_point_says_the_same_usage_line(tmp_path, script, line):
    """``~hydra.callbacks.mandatory_keys``: the task function's own check (covidct.cli.exit_if_keys_missing)."""
    out = run_cli(["~hydra.callbacks.mandatory_keys", f"paths.log_dir={tmp_path}"], tmp_path, script)
    errors = [e for e in out.stderr.splitlines() if "ERROR" in e]
    assert out.returncode == 1 and len(errors) == 1 and line in errors[0], out.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["model=vgg"], "model=vgg: vgg is not a choice of model; did you mean vgg16 or vgg16_bn?"),
        (["experiment=papr"], "experiment=papr: papr is not a choice of experiment; did you mean paper"),
        (["loss.gama=2"], "loss.gama is not a key of the config; did you mean loss.gamma?"),
        (["vote=majority", "vote.tua=0.3"], "vote.tua is not a key of the config; did you mean vote.tau?"),
        (["trainr.max_epochs=2"], "trainr is not a key of the config; did you mean trainer?"),
        (["-m", "model=vgg16,resnt18"], "model=resnt18: resnt18 is not a choice of model; did you mean resnet18"),
        (["-m", "trainer.max_epoch=1,2"], "trainer.max_epoch is not a key of the config; did you mean trainer.max_"),
    ],
)
def test_a_misspelt_choice_or_key_gets_the_nearest_spelling(args, expected):
    from covidct.cli import override_typo
    from covidct.contracts import CONF_DIR

    problem = override_typo(args, CONF_DIR, "train")
    assert problem is not None and problem.startswith(expected), problem
    assert "+" not in problem  # never suggests adding the misspelt key


@pytest.mark.parametrize(
    "config_name, args",
    [
        ("train", ["loss.gamma=2", "model=vgg16"]),
        ("train", ["experiment=paper", "data.root=/data", "data.num_folds=3"]),
        ("train", ["-m", "loss.gamma=0,1,2", "model=vgg16,resnet18", "+trainer.profiler=simple"]),
        ("train", ["--cfg", "job", "hydra.run.dir=/x", "~callbacks.cam_images"]),
        ("predict", ["ckpt_path=/x.ckpt", "input=/y", "vote=majority", "cam_slices=2"]),
    ],
)
def test_a_well_spelt_command_line_passes_the_typo_check(config_name, args):
    from covidct.cli import override_typo
    from covidct.contracts import CONF_DIR

    assert override_typo(args, CONF_DIR, config_name) is None


def test_train_and_predict_stop_on_a_typo_in_one_line_before_any_folder(tmp_path):
    for script, args, near in [
        ("train.py", ["model=vgg"], "did you mean vgg16"),
        ("train.py", ["loss.gama=2"], "did you mean loss.gamma?"),
        ("predict.py", ["ckpt_path=/x.ckpt", "input=/y", "cam_slice=2"], "did you mean cam_slices"),
    ]:
        out = run_cli(args, tmp_path, script=script)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and near in lines[0], out.stderr
        assert list(tmp_path.iterdir()) == []
