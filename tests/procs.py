"""`evomerge search` run as a user runs it, in a subprocess (the fault and Ray tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**changes: str | None) -> dict[str, str]:
    """This process's environment, offline, importing this checkout; a change to None unsets it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def search_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    """`evomerge search CONFIG --out RUN_DIR`, the search alone (no best model, no report)."""
    return [
        sys.executable,
        "-m",
        "evomerge.cli",
        "search",
        str(config),
        "--out",
        str(run_dir),
        "--no-report",
        "--no-save-best",
        *extra,
    ]


def wait_for(
    predicate: Callable[[], bool],
    seconds: float,
    proc: subprocess.Popen[str],
    *,
    interval: float = 0.1,
) -> None:
    """Poll `predicate` until it holds; fail the test (with the search's output) if the search
    ends first or `seconds` pass (the search is then killed)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc.poll() is not None:
            output = proc.stdout or proc.stderr
            pytest.fail(
                f"search exited early ({proc.returncode}): {output.read()[-2000:] if output else ''}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the search")
        time.sleep(interval)
