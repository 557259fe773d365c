"""`python -m serve_app`: start the Serve app with TGI-like flags (the same app `serve run config.yaml` builds).

    python -m serve_app --model-id demo --port 8000 --hostname 127.0.0.1
    python -m serve_app --model-id ./my-llama --lora-adapters sql=./sql-lora,chat=org/chat-lora

Flags mirror text-generation-launcher where the meaning matches (`--model-id`, `--lora-adapters`,
`--max-total-tokens`, `--max-batch-prefill-tokens`, `--max-concurrent-requests`, `--payload-limit`, ...).
Ctrl-C / SIGTERM shuts Serve and the local Ray instance down.

With a loopback `--hostname` (the default) the local Ray instance this starts listens on loopback
only: its GCS, raylet, object manager, agents and workers accept anyone who can reach them, so on a
shared network they must not listen on every interface. Ray (2.x) resolves a loopback node address
to the machine's outward address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (its switch for
single-machine instances); the launcher sets it for the processes it starts, and Ray's token
authentication (`RAY_AUTH_MODE=token`) unless set otherwise. What still listens on all interfaces
(Ray Serve 2.60) is each Serve replica's inter-deployment gRPC server, bound to `[::]` in Ray's own
code; token authentication guards it. With `--haproxy` (opt-in) Ray also binds the replicas' HTTP
ports and HAProxy's stats and metrics ports on all interfaces. For a cluster, start Ray yourself on a private network
(`ray start --head --node-ip-address=...`) and pass `--address`, or use `serve run config.yaml`
(README, "Limits and errors").
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

# flag -> (app arg, type, help). None type = boolean flag.
_FLAGS: list[tuple[str, str, type | None, str]] = [
    ("--model-id", "model", str, "base model: 'demo', a local HF model dir, or a Hub id (default: demo)"),
    ("--revision", "revision", str, "Hub revision of the base model"),
    ("--served-model-name", "served_model_name", str, "public name of the base model (default: --model-id)"),
    ("--lora-adapters", "adapters", str, "adapters as 'id=path,id2=path2' (LORA_ADAPTERS env var works too)"),
    ("--dtype", "dtype", str, "float32 | bfloat16 | float16"),
    ("--device", "device", str, "cpu | cuda | cuda:N (cuda reserves one GPU per model replica)"),
    ("--max-total-tokens", "max_model_len", int, "max prompt + generated tokens per request"),
    ("--max-batch-prefill-tokens", "max_num_batched_tokens", int, "token budget of one engine step"),
    ("--max-batch-size", "max_num_seqs", int, "max sequences decoded together"),
    ("--max-concurrent-requests", "max_waiting", int, "queue bound per replica; beyond it: HTTP 429"),
    ("--max-new-tokens-limit", "max_new_tokens_limit", int, "largest max_new_tokens a request may ask"),
    ("--num-kv-blocks", "num_kv_blocks", int, "KV-cache blocks per replica (default: from --kv-cache-bytes)"),
    ("--kv-cache-bytes", "kv_cache_bytes", int, "KV-cache size per replica when --num-kv-blocks is not set"),
    ("--block-size", "block_size", int, "tokens per KV block"),
    ("--max-adapter-slots", "max_adapter_slots", int, "adapters resident on the device at once"),
    ("--max-lora-rank", "max_lora_rank", int, "largest adapter rank accepted"),
    ("--lora-backend", "lora_backend", str, "auto | torch | triton"),
    ("--seed", "seed", int, "engine seed for requests without one"),
    ("--num-replicas", "model_replicas", int, "model replicas (each holds the base model once)"),
    ("--ingress-replicas", "ingress_replicas", int, "HTTP ingress replicas"),
    ("--replica-num-cpus", "replica_num_cpus", float, "CPUs reserved per model replica"),
    ("--torch-threads", "torch_threads", int, "torch threads per model replica"),
    ("--stream-messages-per-s", "stream_messages_per_s", float,
     "streaming chunks per second per replica, all streams together (0: one per token)"),
    ("--payload-limit", "max_body_bytes", int, "largest request body in bytes (default 2000000, as TGI; beyond: HTTP 413)"),
    ("--max-input-chars", "max_input_chars", int,
     "longest prompt in characters, refused before tokenizing (default: max total tokens x 8)"),
    ("--request-timeout-s", "request_timeout_s", float,
     "seconds a request may take at the ingress, queueing included (default 60; beyond: HTTP 503)"),
    # fair sharing under overload (README, "Fair sharing under overload")
    ("--scheduling-policy", "scheduling_policy", str, "fair (token-fair across adapters, default) | round_robin"),
    ("--adapter-weights", "adapter_weights", str, "service weight per adapter as 'id=2,id2=1' (default 1 each)"),
    ("--max-waiting-per-adapter", "max_waiting_per_adapter", int,
     "waiting requests one adapter may hold per replica; beyond: HTTP 429 for that adapter only"),
    ("--max-waiting-slack", "max_waiting_slack", int,
     "arrivals beyond --max-concurrent-requests still taken from adapters under their share (default: 1/8 of it)"),
    ("--max-queue-wait-s", "max_queue_wait_s", float,
     "seconds a request may wait for its first token (default 60; beyond: HTTP 503 + Retry-After)"),
    ("--engine-request-timeout-s", "engine_request_timeout_s", float,
     "seconds a request may run in the engine before it is stopped (default: none; beyond: HTTP 504)"),
    ("--adapter-load-timeout-s", "adapter_load_timeout_s", float,
     "seconds an adapter load may take before its requests fail (default 60)"),
    ("--refusal-hold-s", "refusal_hold_s", float,
     "after a replica's 429 for an adapter, the ingress refuses that adapter itself this long (default 0.25; 0: off)"),
]
# Ray's switch that keeps a single-machine instance on its loopback address (see the module docstring).
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_AUTH_ENV = "RAY_AUTH_MODE"
# Ray Serve's throughput-optimized mode (Ray >= 2.55): gRPC between Serve's processes, an HTTP server
# in the ingress replica itself, user code on Serve's own loop, buffered access logs. On 2 cores it
# cut the light adapters' p95 TTFT beside floods from ~135 to 97 ms and let the engine serve 87% more
# tokens (README, noisy neighbours). Serve reads it once per process, so it must be set before Ray
# starts: the launcher sets it for a local instance, `serve run` users export it.
SERVE_THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
# Ray Serve's HAProxy ingress (Ray >= 2.55): HAProxy, not Serve's Python proxy actor, takes the HTTP
# connections and forwards them to the ingress replicas' own HTTP servers. Beside two flooding
# adapters on 2 cores it cut the light adapters' p95 TTFT from 345 to 56 ms and the refusals' p99
# from 496 to 64 ms (README, noisy neighbours). Ray then binds the replicas' HTTP ports and HAProxy's stats (8404) and metrics (9101)
# ports on all interfaces, so HAProxy on other nodes can reach them: opt-in (`--haproxy`), for hosts
# whose firewall keeps those ports in.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
    """(app args for build_app, launcher options)."""
    parser = argparse.ArgumentParser(prog="python -m serve_app", description=__doc__.split("\n\n")[0])
    for flag, dest, kind, text in _FLAGS:
        parser.add_argument(flag, dest=f"app_{dest}", metavar=dest.upper(), type=kind, default=None, help=text)
    parser.add_argument("--hostname", "--host", dest="host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--route-prefix", default="/", help="URL prefix of the app (default /)")
    parser.add_argument("--app-name", default="loraserve", help="Serve application name")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--haproxy", action="store_true",
                        help="Serve's HAProxy ingress for the local Ray instance (opens ports on all interfaces; README)")
    opts = parser.parse_args(argv)
    if opts.haproxy and opts.address is not None:
        parser.error(f"--haproxy sets up the local Ray instance; on a cluster set {HAPROXY_ENV}=1 on every node "
                     "before `ray start`")
    app_args = {dest: getattr(opts, f"app_{dest}") for _, dest, _, _ in _FLAGS if getattr(opts, f"app_{dest}") is not None}
    app_args.setdefault("model", "demo")
    app_args["route_prefix"] = opts.route_prefix
    return app_args, opts


def ray_env(opts: argparse.Namespace) -> dict[str, str]:
    """The Ray and Serve switches the launcher sets for the local instance it starts (where the
    environment does not set them already); a cluster's (`--address`) were set when it started."""
    if opts.address is not None:
        return {}
    env = {SERVE_THROUGHPUT_ENV: "1"}  # our own instance: every process of it starts with the same mode
    if is_loopback(opts.host):
        env.update({RAY_LOOPBACK_ENV: "0", RAY_AUTH_ENV: "token"})
    if opts.haproxy:
        env[HAPROXY_ENV] = "1"
    return env


def main(argv: Sequence[str] | None = None) -> int:
    app_args, opts = parse_args(argv)
    local_only = opts.address is None and is_loopback(opts.host)
    # Before Ray is imported: it reads these once, and its processes inherit them.
    for name, value in ray_env(opts).items():
        os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from serve_app.app import build_app

    app = build_app(app_args)  # fails fast on bad arguments, before Ray starts
    # From here on Ctrl-C / SIGTERM only ask to stop, so that a signal arriving while Serve is still
    # starting (serve.run waits for the app) still ends in an orderly serve.shutdown().
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if not ray.is_initialized():
        node_ip = {"_node_ip_address": "127.0.0.1"} if local_only else {}
        ray.init(address=opts.address, num_cpus=opts.num_cpus, include_dashboard=False, namespace="serve", **node_ip)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(app, name=opts.app_name, route_prefix=opts.route_prefix, blocking=False)
    print(f"loraserve: serving on http://{opts.host}:{opts.port}{opts.route_prefix} (Ctrl-C to stop)", flush=True)

    while not stop.wait(1.0):  # short waits keep the main thread responsive to signals
        pass
    if opts.address:  # a shared cluster: take down our app only
        serve.delete(opts.app_name)
    else:  # our own local Ray instance: Serve and Ray go with us
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
