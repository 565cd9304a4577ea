"""Ray as a user meets it: a `ray start` cluster with token authentication, Ctrl-C, a killed driver.

Each test drives `evomerge search` as a subprocess (as a user would) on the quick zoo.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import ROOT, cli_env, search_command, wait_for
from test_search import write_config

from evomerge.run_dir import read_trials

pytestmark = pytest.mark.slow


def _search(config: Path, run_dir: Path, *extra: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        search_command(config, run_dir, *extra),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # A shell that runs the tests in the background ignores SIGINT, and its children inherit
        # that: the search must see Ctrl-C as a terminal delivers it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    return children


def _descendants(*roots: int) -> set[int]:
    children, found, todo = _children(), set(), list(roots)
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.add(pid)
            todo.append(pid)
    return found


def _in_group(pgid: int) -> set[int]:
    pids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getpgid(int(name)) == pgid:
                    pids.add(int(name))
            except OSError:
                continue
    return pids


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.time() + seconds
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A real `ray start --head` cluster with token authentication; stopped (only it) afterwards."""
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the ray CLI is not installed")
    root = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))  # Ray's socket paths must stay short
    token = root / "token"
    token.write_text("evomerge-test-" + os.urandom(8).hex())
    port = _free_port()
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    start = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--temp-dir",
            str(root / "ray"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = start.communicate(timeout=90)
        assert start.returncode == 0, out
        yield {
            "address": f"127.0.0.1:{port}",
            "token": token,
            "logs": root / "ray" / "session_latest" / "logs",
        }
    finally:
        # the daemons stay in the `ray start` process group; the workers they spawned are their descendants
        group = _in_group(start.pid)
        for pid in group | _descendants(*group):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_search_joins_a_ray_start_cluster_with_token_auth(quick_zoo, ray_cluster, tmp_path):
    config = write_config(tmp_path, quick_zoo, workers=2, budget={"max_evals": 4})
    run_dir = tmp_path / "run"
    # RAY_AUTH_MODE unset, as in a fresh shell: the token is found where Ray's CLI finds it
    env = cli_env(RAY_AUTH_MODE=None, RAY_AUTH_TOKEN_PATH=str(ray_cluster["token"]))
    proc = _search(config, run_dir, "--ray-address", ray_cluster["address"], env=env)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert (
        "Token authentication" not in out and "Loading weights" not in out
    )  # the search's own output only
    trials = read_trials(run_dir)
    assert len(trials) == 4 and all(t.status == "ok" for t in trials)
    # every trial ran in a worker process of that cluster (its logs name the worker's pid)
    cluster_pids = {
        int(m.group(1))
        for f in ray_cluster["logs"].glob("worker-*")
        if (m := re.search(r"-(\d+)\.(?:out|err)$", f.name))
    }
    assert {int(t.worker.rsplit(":", 1)[1]) for t in trials} <= cluster_pids


def test_search_without_the_clusters_token_fails_in_one_line(quick_zoo, ray_cluster, tmp_path):
    config = write_config(tmp_path, quick_zoo, workers=2, budget={"max_evals": 4})
    run_dir = tmp_path / "run"
    env = cli_env(
        RAY_AUTH_MODE=None,
        RAY_AUTH_TOKEN=None,
        RAY_AUTH_TOKEN_PATH=str(tmp_path / "no-token"),
        HOME=str(tmp_path),
    )
    proc = _search(config, run_dir, "--ray-address", ray_cluster["address"], env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert (
        out.strip().count("\n") == 0
        and "requires token authentication" in out
        and "RAY_AUTH_TOKEN" in out
    ), out
    assert not run_dir.exists()


def _embedded_search(quick_zoo, tmp_path) -> tuple[subprocess.Popen[str], Path]:
    config = write_config(tmp_path, quick_zoo, workers=2, budget={"max_evals": 200})
    run_dir = tmp_path / "run"
    return _search(config, run_dir, env=cli_env()), run_dir


def _ray_started(proc: subprocess.Popen[str]) -> bool:
    names = set()
    for pid in _descendants(proc.pid):
        with contextlib.suppress(OSError):
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    return "raylet" in names


def test_a_killed_driver_leaves_no_ray_process_running(quick_zoo, tmp_path):
    proc, run_dir = _embedded_search(quick_zoo, tmp_path)
    wait_for(lambda: len(read_trials(run_dir)) >= 1, 240, proc)
    ours = _descendants(proc.pid)
    assert len(ours) >= 5  # GCS, raylet, agents, two workers
    proc.kill()
    proc.wait()
    assert _wait_gone(ours, 10) == set()


@pytest.mark.parametrize("when", ["worker start-up", "mid-run"])
def test_ctrl_c_says_how_to_resume_and_stops_ray(quick_zoo, tmp_path, when):
    proc, run_dir = _embedded_search(quick_zoo, tmp_path)
    if when == "worker start-up":
        wait_for(lambda: _ray_started(proc), 120, proc)
    else:
        wait_for(lambda: len(read_trials(run_dir)) >= 1, 240, proc)
    ours = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole foreground process group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert f"evomerge search --resume {run_dir}" in out, out
    assert "Traceback" not in out, out
    assert _wait_gone(ours, 10) == set()
    if when == "mid-run":
        done = len(read_trials(run_dir))
        assert done >= 1 and f"{done} trials" in out
