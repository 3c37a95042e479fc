"""Reading processes die with the process that started them, even after ``kill -9`` (Linux).

Tried for real: a cache build (``covidct.data.cache._read_all``) and predict.py's DICOM readers
(``covidct.predict.test_sets.read_patients``) run in a child process whose workers hang on their first patient;
the child is SIGKILLed, and its workers must be gone within seconds, not kept alive under PID 1.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covidct.processes import die_with_parent
from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

#: the child: start 2 workers whose read hangs (each writes its pid into argv[2] first), and wait on them
CHILD = """
import os, sys, time
from pathlib import Path
from types import SimpleNamespace

import covidct.data.cache as cache
import covidct.predict.test_sets as inference

def hang(folder, preprocessor):
    (Path(sys.argv[2]) / str(os.getpid())).touch()
    time.sleep(600)

folders = [Path(f"patient{i}") for i in range(4)]
if sys.argv[1] == "cache":
    cache._read_patient = hang  # forked workers see the module as the parent left it
    list(cache._read_all([SimpleNamespace(folder=f) for f in folders], None, 2))
else:
    inference.read_patient = hang
    list(inference.read_patients(folders, None, 2))
"""


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a container's PID 1 may never reap what it inherits)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float) -> bool:
    """Poll ``condition`` every 50 ms until it holds or ``timeout`` seconds have passed."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("reader", ["cache", "inference"])
def test_workers_die_when_their_parent_is_killed(tmp_path, reader):
    child = subprocess.Popen([sys.executable, "-c", CHILD, reader, str(tmp_path)], cwd=REPO, env=cli_env())
    workers: list[int] = []
    try:
        assert wait_until(lambda: len(list(tmp_path.iterdir())) == 2 or child.poll() is not None, 60)
        workers = [int(p.name) for p in tmp_path.iterdir()]
        assert len(workers) == 2 and all(map(running, workers)), f"child ended with {child.poll()}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert wait_until(lambda: not any(map(running, workers)), 10), [w for w in workers if running(w)]
    finally:
        child.kill()
        for pid in filter(running, workers):  # only the hanging workers this test started
            os.kill(pid, signal.SIGKILL)


def test_a_worker_whose_parent_died_before_it_armed_the_signal_ends_itself():
    fork = multiprocessing.get_context("fork")
    its_parent = fork.Process(target=die_with_parent, args=(os.getpid(),))
    another = fork.Process(target=die_with_parent, args=(os.getppid(),))  # as if reparented: not its parent
    for worker in (its_parent, another):
        worker.start()
        worker.join(timeout=30)
    assert its_parent.exitcode == 0 and another.exitcode == -signal.SIGKILL
