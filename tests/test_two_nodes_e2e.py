"""Two Ray nodes on one machine (issue 13, point 4): replicas spread over both, adapters resolve on both,
and stopping the second node leaves the service answering from the first.

The cluster: a head node and a second node, 1 CPU each, both on 127.0.0.1 and listening on loopback
only, started and stopped by the test. Started with `ray.cluster_utils.Cluster`, Ray's own way to
run several nodes on one machine, not with two `ray start` commands: Ray 2.60's CLI cannot build a
loopback-only cluster (a second `ray start --address` needs `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` on,
and then rewrites 127.0.0.1, in both `--address` and `--node-ip-address`, to the machine's outward
address; a node whose address is not 127.0.0.1 listens on every interface). A Ray node binds
loopback when its address is 127.0.0.1, which Cluster lets the test say.

The driver (what `serve run` or `python -m serve_app --address ...` is on a real cluster) runs in a
subprocess with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, so that its `ray.init(address="127.0.0.1:...")`
is not rewritten either: it deploys the demo model with 2 model replicas of 1 CPU each (the only
way to place them is one per node), Serve's HTTP proxy on the head only, and waits until the test
closes its stdin. Each node's processes descend from its raylet, so /proc tells which node a
replica runs on (its parent raylet's `--node_id`), as test_replica_loss_e2e.py finds its replicas.

1. Both replicas RUNNING, on different nodes; every listening socket of the cluster on loopback
   (but each Serve replica's inter-deployment gRPC server, bound to [::] in Ray Serve's own code).
2. Requests for several adapters get 200 from each replica (per-replica /metrics), with the same
   tokens: each replica loaded the adapters from its own node's disk.
3. The second node is stopped (its raylet and everything under it, as `ray stop` on that machine).
   Within a bounded time the service answers 200 again, from the first node's replica, for every
   adapter, and keeps answering; /metrics shows one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.demo import DEMO_ADAPTERS, build_demo
from tests.ray_serve_helpers import (
    REPO,
    free_port,
    is_loopback_ip,
    patched_environ,
    python_path_with_repo,
    wait_gone,
)

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(420)]

APP = "two-nodes"
ADAPTERS = [a[0] for a in DEMO_ADAPTERS[:4]]
REPLICA_TITLE = f"ray::ServeReplica:{APP}:ModelReplica"
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # serve_app/__main__.py explains the switch
DEPLOY_TIMEOUT_S = 240.0
RECOVERY_TIMEOUT_S = 60.0  # from the node stop to the first 200
CLIENT_TIMEOUT_S = 30.0
ROUNDS = 8  # of concurrent requests per adapter, until both replicas served each
ARGS: dict[str, Any] = {
    "model": "demo",
    "model_replicas": 2,
    "replica_num_cpus": 1,  # one per node: each node has 1 CPU
    "num_kv_blocks": 256,
    "max_model_len": 512,
    "max_num_seqs": 16,
    # Serve's power-of-two router (no adapter affinity): requests for one adapter reach both replicas.
    "affinity_routing": False,
    "request_timeout_s": 20,
    "stream_messages_per_s": 20,
}

# The driver: deploys the app, prints one line when it serves, tears Serve down when its stdin closes.
DRIVER = """
import json, sys
import ray
from ray import serve
from serve_app.app import build_app

address, port, app, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
ray.init(address=address, _node_ip_address="127.0.0.1", namespace="serve", logging_level="warning")
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
serve.run(build_app(args), name=app, route_prefix="/")
print("deployed", flush=True)
sys.stdin.read()
serve.shutdown()
ray.shutdown()
"""


@dataclass
class TwoNodes:
    cluster: Any  # ray.cluster_utils.Cluster
    second: Any  # the second node (ray._private.node.Node, as Cluster.add_node returns it)
    root: Path  # the cluster's temp dir: every one of its processes names it or descends from one that does
    url: str = ""

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (nodes, their workers, the driver)."""
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if p.info["status"] != psutil.STATUS_ZOMBIE and str(self.root) in " ".join(p.info["cmdline"] or []):
                    found.append(p)
        out = {p.pid: p for p in found}
        for p in found:
            with contextlib.suppress(psutil.Error):
                out.update({c.pid: c for c in p.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE})
        return list(out.values())

    def replica_nodes(self) -> dict[int, str]:
        """pid -> node id of each live ModelReplica of the app (its parent is its node's raylet)."""
        out = {}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                if " ".join(p.cmdline()).startswith(REPLICA_TITLE):
                    raylet = " ".join(p.parent().cmdline())
                    match = re.search(r"--node_id=([0-9a-f]+)", raylet)
                    assert match, raylet[:200]
                    out[p.pid] = match.group(1)
        return out


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    from ray.cluster_utils import Cluster

    cache = tmp_path_factory.mktemp("two-nodes") / "cache"
    build_demo(cache)
    root = Path(tempfile.mkdtemp(prefix="ls2n", dir="/tmp"))  # short: UNIX socket path limit
    (root / "ray").mkdir()
    # Inherited by every node process and, through the raylets, by every replica.
    env = {"LORASERVE_CACHE_DIR": str(cache), "RAY_TMPDIR": str(root), RAY_LOOPBACK_ENV: "0",
           "PYTHONPATH": python_path_with_repo(os.environ.get("PYTHONPATH"))}
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "temp_dir": str(root / "ray"),
            "object_store_memory": 100 * 1024**2}
    try:
        with patched_environ(env, removed=("RAY_ADDRESS",)):
            cluster = None
            try:
                cluster = Cluster(initialize_head=True, head_node_args={
                    **node, "include_dashboard": False, "dashboard_port": free_port(),
                    "dashboard_agent_listen_port": free_port()})  # never Ray's fixed defaults: other instances may run
                yield TwoNodes(cluster, cluster.add_node(**node), root)
            finally:
                if cluster is not None:
                    cluster.shutdown()
    finally:
        leftovers = wait_gone(lambda: _survivors(root))
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"processes of the test's Ray cluster survived: {leftovers}"


def _survivors(root: Path) -> list[str]:
    found = []
    for p in TwoNodes(None, None, root).processes():
        with contextlib.suppress(psutil.Error):  # exited meanwhile: not a survivor
            found.append(f"{p.pid}: {' '.join(p.cmdline())[:100]}")
    return found


@pytest.fixture(scope="module")
def served(two_nodes: TwoNodes) -> Iterator[TwoNodes]:
    port = free_port()
    log = two_nodes.root / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, two_nodes.cluster.address, str(port), APP,
                                   json.dumps(ARGS)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=out)
    try:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        assert driver.stdout is not None
        os.set_blocking(driver.stdout.fileno(), False)
        while b"deployed" not in (driver.stdout.read() or b""):
            assert driver.poll() is None, f"the driver exited with {driver.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not deployed after {DEPLOY_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        two_nodes.url = f"http://127.0.0.1:{port}"
        yield two_nodes
    finally:
        assert driver.stdin is not None
        with contextlib.suppress(OSError):
            driver.stdin.close()  # the driver shuts Serve down
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()


def body(adapter: str, i: int, max_new_tokens: int = 16) -> dict[str, Any]:
    return {"inputs": f"The quick brown fox {i}", "parameters": {"adapter_id": adapter, "max_new_tokens": max_new_tokens}}


async def send_all(url: str, payloads: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        return list(await asyncio.gather(*(client.post("/generate", json=p) for p in payloads)))


def ok_by_replica(url: str) -> dict[str, dict[str, float]]:
    """replica -> adapter -> requests answered ok, from /metrics (every live replica answers it)."""
    text = httpx.get(f"{url}/metrics", timeout=CLIENT_TIMEOUT_S).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "loraserve_requests_total" and s.labels["status"] == "ok":
                out.setdefault(s.labels["replica"], {})[s.labels["adapter"]] = s.value
    return out


def test_replicas_spread_over_both_nodes_and_survive_the_second_ones_stop(served: TwoNodes) -> None:
    head, second = served.cluster.head_node.node_id, served.second.node_id

    # 1. one replica per node, nothing of the cluster listening beyond loopback
    placement = served.replica_nodes()
    assert sorted(placement.values()) == sorted([head, second]), placement
    listening = []
    for p in served.processes():
        with contextlib.suppress(psutil.Error):
            listening += [(p.pid, c.laddr.ip, p.name()) for c in p.net_connections(kind="tcp")
                          if c.status == psutil.CONN_LISTEN]
    outside = [entry for entry in listening if not is_loopback_ip(entry[1])]
    assert listening and all(name.startswith("ray::ServeReplica") for _, _, name in outside), outside

    # 2. every adapter answered by both replicas, with the same tokens (greedy). The router picks the
    # less loaded replica for each request, so a round of concurrent requests for an adapter usually
    # reaches both; rounds go on (a bounded number) for the adapters one replica has not served yet.
    texts: dict[tuple[str, str], set[str]] = {}
    missing = list(ADAPTERS)
    for _ in range(ROUNDS):
        payloads = [body(adapter, i % 3) for adapter in missing for i in range(8)]
        answers = asyncio.run(send_all(served.url, payloads))
        assert all(r.status_code == 200 for r in answers), [r.text[:200] for r in answers if r.status_code != 200]
        for p, r in zip(payloads, answers):
            texts.setdefault((p["parameters"]["adapter_id"], p["inputs"]), set()).add(r.json()["generated_text"])
        served_ok = ok_by_replica(served.url)
        assert len(served_ok) == 2, served_ok
        missing = [a for a in ADAPTERS if any(adapters.get(a, 0) < 1 for adapters in served_ok.values())]
        if not missing:
            break
    assert not missing, f"adapters served by one replica only after {ROUNDS} rounds: {missing}"
    assert all(len(t) == 1 for t in texts.values()), texts

    # 3. the second node stops; the first node's replica answers every adapter from then on
    served.cluster.remove_node(served.second)
    stopped = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(f"{served.url}/generate", json=body(ADAPTERS[0], 0, 4), timeout=CLIENT_TIMEOUT_S).status_code == 200:
                break
        assert time.monotonic() - stopped < RECOVERY_TIMEOUT_S, f"no 200 within {RECOVERY_TIMEOUT_S}s of the stop"
        time.sleep(0.5)
    after = asyncio.run(send_all(served.url, [body(adapter, i % 3) for adapter in ADAPTERS for i in range(6)]))
    assert all(r.status_code == 200 for r in after), [r.text[:200] for r in after if r.status_code != 200]
    for p, r in zip([body(a, i % 3) for a in ADAPTERS for i in range(6)], after):
        assert r.json()["generated_text"] in texts[(p["parameters"]["adapter_id"], p["inputs"])]
    assert list(served.replica_nodes().values()) == [head]
    assert len(ok_by_replica(served.url)) == 1
