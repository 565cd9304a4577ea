"""Start, join and leave Ray: quietly, with token authentication found as Ray's own CLI finds it, and
leaving no process of ours running, even when the driver is killed.

`connect(address, num_cpus)` either joins a running cluster or starts a local Ray for this driver; the
`RayConnection` it returns shuts down (or disconnects from) what it started.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

AUTH_MODE_ENV = "RAY_AUTH_MODE"

# Runs beside a driver that started a local Ray. It notes the driver's new descendants (GCS, raylet,
# the dashboard and runtime-env agents, workers) every half second; once the driver is gone (its end of the
# pipe on stdin closes, however it died) it kills those still running. Ray's agents otherwise wait
# minutes on the dead GCS before they exit.
_REAPER = r"""
import os, signal, sys, threading, time
driver = int(sys.argv[1])
seen = {}  # pid -> start time, so a reused pid is never killed

def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19]  # ppid, start time

def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid, start = stat(int(name))
            except OSError:
                continue
            children.setdefault(ppid, []).append((int(name), start))
    found, todo = {}, [driver]
    while todo:
        for pid, start in children.get(todo.pop(), ()):
            if pid != os.getpid():
                found[pid] = start
                todo.append(pid)
    return found

before = descendants()  # the driver's other children are not Ray's
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.buffer.read(), done.set()), daemon=True).start()
while not done.wait(0.5):
    seen.update(descendants())
seen.update(descendants())
for pid, start in seen.items():
    if before.get(pid) == start:
        continue
    try:
        if stat(pid)[1] == start:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


@dataclass
class RayConnection:
    """What `connect` started; `close()` leaves the cluster as it was found."""

    ray: Any
    owns_ray: bool
    reaper: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.owns_ray = False
        if self.reaper is not None:
            self.reaper.stdin.close()  # type: ignore[union-attr]  # the reaper kills any straggler and exits
            self.reaper.wait(timeout=30)
            self.reaper = None


def connect(address: str | None, num_cpus: int) -> RayConnection:
    """Join the cluster at `address`, use a Ray already started in this process, or start a local one."""
    import ray

    if ray.is_initialized():
        return RayConnection(ray, owns_ray=False)
    if address:
        _join(ray, address)
        return RayConnection(ray, owns_ray=True)
    # Ray turns token authentication on for a new local cluster and warns that it did so on every
    # start; saying so explicitly keeps the same behaviour without the warning.
    if AUTH_MODE_ENV not in os.environ:
        _enable_token_auth()
    reaper = _start_reaper() if sys.platform.startswith("linux") else None
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except BaseException:
        if reaper is not None:
            reaper.stdin.close()  # type: ignore[union-attr]
        raise
    return RayConnection(ray, owns_ray=True, reaper=reaper)


def check_cluster(address: str) -> None:
    """The cluster at `address` answers and accepts this driver's token (seconds; before any run directory)."""
    _check_reachable(address)
    _use_token_if_available()
    _check_authentication(address)


def _join(ray: Any, address: str) -> None:
    check_cluster(address)
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EvomergeError(
            f"--ray-address: '{address}' is not HOST:PORT (the address `ray start --head` printed)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise EvomergeError(
            f"--ray-address: no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start --head`"
        ) from None


def token_available() -> bool:
    """A token where Ray looks for one: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    ).expanduser()
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def _use_token_if_available() -> None:
    """Turn token authentication on when a token is at hand and RAY_AUTH_MODE is unset, as `ray start`
    and `ray.init()` do for a local cluster (Ray skips this step when given an explicit address)."""
    if AUTH_MODE_ENV not in os.environ and token_available():
        _enable_token_auth()


def _enable_token_auth() -> None:
    """For this process and the Ray processes it starts (what Ray's own `_enable_token_auth` does)."""
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize(
        ""
    )  # Ray caches its config when imported: let this process see the new mode too


def _check_authentication(address: str) -> None:
    """A quick call to the cluster's GCS: a missing or wrong token is one line, not a 30 s retry loop."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _stderr_silenced():  # the client logs the refusal itself, in C++
            GcsClient(address=address)
    except AuthenticationError:
        have = "the token Ray found was refused" if token_available() else "no token was found"
        raise EvomergeError(
            f"--ray-address: the Ray cluster at {address} requires token authentication and {have}; set RAY_AUTH_TOKEN "
            f"(or RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on its head node)"
        ) from None
    except Exception:
        return  # not an authentication problem: ray.init reports it


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _start_reaper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
