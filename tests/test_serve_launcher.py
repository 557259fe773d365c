"""`python -m serve_app` (the TGI-like launcher) end to end: flags and LORA_ADAPTERS reach the app.

Its own module so that pytest tears the `serve run` instance of test_serve_e2e.py down first: only
one local Ray instance runs at a time on a 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from models.demo import build_demo
from tests.ray_serve_helpers import (
    REPO,
    free_port,
    is_loopback_ip,
    python_path_with_repo,
    stop_ray_launcher,
    wait_healthy,
)
from tests.test_serve_e2e import PROMPT

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(400)]


def _listening_addresses(pid: int) -> list[tuple[int, str, int, str]]:
    """(pid, ip, port, process name) of every listening TCP socket of `pid` and its descendants."""
    root = psutil.Process(pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            sockets = process.net_connections(kind="tcp")
            name = process.name()
        except psutil.Error:  # a worker that exited meanwhile
            continue
        found += [(process.pid, c.laddr.ip, c.laddr.port, name) for c in sockets if c.status == psutil.CONN_LISTEN]
    return found


def test_launcher_serves_with_tgi_flags(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    demo = build_demo(cache)
    extra = tmp_path / "copy-of-qv-r4"
    shutil.copytree(demo / "adapters" / "qv-r4", extra)  # same weights under a new id
    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="lsrv", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LORASERVE_CACHE_DIR=str(cache), RAY_TMPDIR=str(ray_tmp), LORA_ADAPTERS=f"extra={extra}",
               PYTHONPATH=python_path_with_repo(env.get("PYTHONPATH")))
    log = tmp_path / "launcher.log"
    cmd = [sys.executable, "-m", "serve_app", "--model-id", "demo", "--port", str(port), "--hostname", "127.0.0.1",
           "--max-total-tokens", "256", "--max-batch-size", "8", "--num-kv-blocks", "64", "--num-cpus", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, log, [f"{url}/health"], 300)
        info = httpx.get(f"{url}/info", timeout=30).json()
        assert info["max_total_tokens"] == 256 and info["max_batch_size"] == 8
        assert "extra" in {a["id"] for a in info["adapters"]} and len(info["adapters"]) == 9
        outs = [httpx.post(f"{url}/generate", timeout=60, json={
            "inputs": PROMPT, "parameters": {"adapter_id": a, "max_new_tokens": 8}}).json() for a in ("extra", "qv-r4")]
        assert outs[0] == outs[1]
        # --hostname 127.0.0.1: the launcher's Ray instance (GCS, raylet, agents, workers) listens on loopback
        # only. The exception, bound to [::] in Ray Serve's own code: each replica's inter-deployment gRPC
        # server, which Ray's token authentication (on) guards.
        listening = _listening_addresses(proc.pid)
        outside = [entry for entry in listening if not is_loopback_ip(entry[1])]
        assert listening and all(name.startswith("ray::ServeReplica") for _pid, _ip, _port, name in outside), outside
        assert all(psutil.Process(pid).environ().get("RAY_AUTH_MODE") == "token" for pid, *_ in outside)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        leftovers = stop_ray_launcher(proc, ray_tmp)
        assert not leftovers, f"processes of the launcher's Ray instance survived: {leftovers}"
