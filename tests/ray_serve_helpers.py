"""Scaffolding shared by the Ray Serve end-to-end tests: a private local Ray + Serve instance, free
ports, and the /proc reads that prove every process of a test's Ray instance is gone at teardown.

Each instance gets a short private Ray temp dir: it isolates it (sockets, logs) from any other Ray on
the machine, and every process of the instance names it on its command line, which is how teardown
finds survivors (short because of the UNIX socket path limit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
GONE_TIMEOUT_S = 30.0  # how long a stopped Ray instance's processes may take to exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback_ip(ip: str) -> bool:
    """Whether a listening socket's address (IPv4, IPv6 or IPv4-mapped IPv6) is loopback only."""
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")


def python_path_with_repo(current: str | None) -> str:
    """PYTHONPATH with this checkout first, so that Ray's worker processes import it."""
    return os.pathsep.join(filter(None, [str(REPO), current]))


def proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line), read from /proc (Linux; no psutil needed)."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            table[int(entry.name)] = (int(fields[1]), fields[0], cmdline)
    return table


def descendants(pid: int) -> set[int]:
    table = proc_table()
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (ppid, _, _) in table.items() if ppid == parent and p not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def alive(pids: set[int]) -> set[int]:
    table = proc_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def ray_processes(ray_tmp: Path) -> list[str]:
    """Live processes whose command line names this Ray temp dir (raylet, gcs, workers...)."""
    return [f"{pid}: {cmd[:120]}" for pid, (_, state, cmd) in proc_table().items()
            if str(ray_tmp) in cmd and state != "Z"]


def wait_gone(survivors: Callable[[], list[str]], timeout_s: float = GONE_TIMEOUT_S) -> list[str]:
    """Until `survivors()` is empty or `timeout_s` passed; returns what still survives."""
    deadline = time.monotonic() + timeout_s
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.5)
    return survivors()


@contextlib.contextmanager
def patched_environ(updates: dict[str, str], removed: tuple[str, ...] = ()) -> Iterator[None]:
    """os.environ with `updates` set and `removed` unset, restored on exit (Ray's processes inherit it)."""
    saved = {k: os.environ.get(k) for k in (*updates, *removed)}
    os.environ.update(updates)
    for key in removed:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def local_serve(cache_dir: Path, ray_tmp_prefix: str) -> Iterator[int]:
    """A Ray instance in this process (2 CPUs, no dashboard) and Serve on 127.0.0.1; yields Serve's HTTP port.

    Its processes find the demo cache through LORASERVE_CACHE_DIR and this checkout on PYTHONPATH. On
    exit Serve and Ray shut down and the test fails if any process of that Ray instance survives.
    """
    import ray
    from ray import serve

    ray_tmp = Path(tempfile.mkdtemp(prefix=ray_tmp_prefix, dir="/tmp"))
    env = {"LORASERVE_CACHE_DIR": str(cache_dir), "PYTHONPATH": python_path_with_repo(os.environ.get("PYTHONPATH"))}
    port = free_port()
    try:
        with patched_environ(env, removed=("RAY_ADDRESS",)):
            try:
                ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(ray_tmp), logging_level="warning")
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                yield port
            finally:
                with contextlib.suppress(Exception):
                    serve.shutdown()
                ray.shutdown()
    finally:
        leftovers = wait_gone(lambda: ray_processes(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not leftovers, f"processes of the test's Ray instance survived: {leftovers}"


def replica_states(app: str, deployment: str = "ModelReplica") -> dict[str, int]:
    """Replica count by state ("RUNNING", "STARTING", ...) of `deployment` in `app`, as Serve's controller sees it."""
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {str(getattr(k, "value", k)): int(v) for k, v in status.replica_states.items()}


def log_tail(log: Path, n: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    return ""


def wait_healthy(proc: subprocess.Popen[bytes], log: Path, urls: list[str], timeout_s: float) -> None:
    """Until every `urls` answers GET 200; fails the test (with the log's tail) if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if all(httpx.get(u, timeout=5).status_code == 200 for u in urls):
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{urls} not healthy after {timeout_s}s:\n{log_tail(log)}")
        time.sleep(0.5)


def stop_ray_launcher(proc: subprocess.Popen[bytes], ray_tmp: Path) -> list[str]:
    """Ctrl-C a process that runs a local Ray instance (`serve run`, the launcher), then make sure every
    process of that instance is gone. Returns the leftovers."""
    tree = descendants(proc.pid)  # raylet, gcs, workers (replicas, proxy, controller), agents, ...
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # serve run: serve.shutdown() and the local Ray instance with it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    wait_gone(lambda: [str(pid) for pid in alive(tree)])
    for pid in alive(tree):  # only processes this test started, by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    leftovers = ray_processes(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return leftovers
