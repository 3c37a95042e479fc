"""Run ``train.py`` / ``predict.py`` / ``python -m covidct....`` in this pytest process, as the shell would run them.

A Python process start costs ~10 s here (torch + Lightning imports); the suite checks exit codes, one-line
errors and output files of ~40 command lines, so they run in-process: ``sys.argv`` set, the script executed
as ``__main__`` (Hydra's own argument parsing, config composition, callbacks and error handling), stdout and
stderr captured, ``SystemExit`` turned into the exit code. What a command changes in the process (logging
handlers Hydra configured, environment variables, signal handlers, the working directory, warning filters,
torch's thread count and determinism, Hydra's global state) is put back afterwards, so the next test starts
clean. A few tests still start real processes: signals, DDP, import side effects, the ``__main__`` guards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra

REPO = Path(__file__).resolve().parents[1]
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _logger_state() -> dict[str, tuple]:
    loggers = [logging.root] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    return {
        logger.name: (logger, list(logger.handlers), logger.level, logger.propagate, logger.disabled)
        for logger in loggers
    }


def _restore_loggers(before: dict[str, tuple]) -> None:
    for logger in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger):
            continue
        kept = before.get(logger.name)
        for handler in logger.handlers:
            if kept is None or handler not in kept[1]:
                handler.close()  # the run's .log file
        if kept is None:
            logger.handlers, logger.disabled = [], False
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
        else:
            logger.handlers, logger.propagate, logger.disabled = kept[1], kept[3], kept[4]
            logger.setLevel(kept[2])


@contextlib.contextmanager
def _process_state(cwd: Path, argv: list[str], env: dict[str, str] | None):
    """Everything a command may change in the process, restored on the way out."""
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_signals = {sig: signal.getsignal(sig) for sig in SIGNALS}
    saved_loggers, saved_disable = _logger_state(), logging.root.manager.disable
    saved_threads, saved_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    GlobalHydra.instance().clear()
    try:
        with warnings.catch_warnings():
            os.chdir(cwd)
            sys.argv = argv
            if env is not None:
                os.environ.update(env)
            yield
    finally:
        GlobalHydra.instance().clear()
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        _restore_loggers(saved_loggers)
        logging.disable(saved_disable)
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)


def run_command(
    args: list[str], cwd: Path, script: str = "train.py", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` (or ``python -m <module> <args>`` when ``script`` is ``-m covidct.x``) run in
    this process from ``cwd``: a CompletedProcess with the exit code and the captured stdout / stderr."""
    if script.startswith("-m "):  # the module's file (its package's __main__.py), as ``python -m`` runs it
        spec = importlib.util.find_spec(script.removeprefix("-m ").strip())
        assert spec is not None and spec.origin is not None, script
        origin = Path(spec.origin)
        path = str(origin.parent / "__main__.py" if spec.submodule_search_locations else origin)
    else:
        path = str(REPO / script)
    target, argv0 = (lambda: runpy.run_path(path, run_name="__main__")), path
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with (
        _process_state(Path(cwd), [argv0, *args], env),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            target()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
        except BaseException:  # what the interpreter would print for an uncaught exception, and exit 1
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([argv0, *args], code, stdout.getvalue(), stderr.getvalue())
