"""Process pools whose workers die with the process that started them, even when it is SIGKILLed.

Nothing runs in a process killed with ``kill -9`` (the OOM killer, a cluster's hard limit), so nothing
stops its pool: the workers, reparented to PID 1, kept their memory (~580 MB each during a cache build)
for minutes. On Linux each worker of :func:`worker_pool` asks the kernel for SIGKILL when its parent
dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere workers are not tied to their parent.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: ``<linux/prctl.h>``: the signal a process gets when its parent dies
PR_SET_PDEATHSIG = 1


def worker_context() -> multiprocessing.context.BaseContext:
    """fork on Linux, spawn elsewhere. A spawned worker re-imports the main module (train.py pulls in
    torch, Lightning and Hydra: ~8 s per worker on 2 cores, measured), which made 2 workers slower
    than 1 process on a 470-slice build (19.6 s vs 12.1 s); forked ones start at once (7.8 s). The
    workers only decode DICOM (pydicom, numpy, single-threaded OpenCV), as DataLoader workers do,
    which also fork by default on Linux."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def die_with_parent(parent: int) -> None:
    """In a worker (Linux; elsewhere nothing): be SIGKILLed when the parent dies. ``parent``: the pid of
    the process that started the worker. Had it died already (between the fork and this call), no signal
    would come: the worker then kills itself. The kernel sends the signal when the parent *thread* that
    started the worker ends, so a pool must be used from the thread that made it."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def _start_worker(parent: int, initializer: Callable[[], None] | None) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer()


def worker_pool(workers: int, initializer: Callable[[], None] | None = None) -> ProcessPoolExecutor:
    """``workers`` processes (:func:`worker_context`) that die with this process (:func:`die_with_parent`),
    each running ``initializer`` first (a module-level function: spawned workers import it)."""
    return ProcessPoolExecutor(
        workers, mp_context=worker_context(), initializer=_start_worker, initargs=(os.getpid(), initializer)
    )


def host_prefix(name: str) -> str:
    """``<name>-<host>-``: the start of a scratch folder's name that :func:`remove_dead_scratch` reads the pid
    after (``<name>-<host>-<pid>-...``)."""
    return f"{name}-{socket.gethostname()}-"


def remove_dead_scratch(parent: Path, prefix: str, what: str) -> None:
    """Delete the folders ``parent/<prefix><pid>-*`` whose process of this host is gone (``prefix`` from
    :func:`host_prefix`): scratch left by a killed process. Those of live processes, or of other hosts sharing
    the folder, stay. ``what``: what such a folder held, for the warning."""
    for scratch in parent.glob(f"{prefix}*"):
        pid = scratch.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            logging.getLogger(__name__).warning("Removing %s: %s", scratch, what)
            shutil.rmtree(scratch, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
