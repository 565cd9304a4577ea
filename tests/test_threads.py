"""OpenMP settings every evomerge process runs torch with."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import evomerge.cli, torch, os; print(os.environ['OMP_WAIT_POLICY'])"


def _probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_openmp_threads_sleep_instead_of_spinning_when_they_wait():
    """Spinning threads slow a merge many times over when other processes want the cores."""
    assert _probe() == "PASSIVE"


def test_the_users_openmp_wait_policy_wins():
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
