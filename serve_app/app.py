"""`build_app(args)`: the Ray Serve application builder that config.yaml's `import_path` names.

    applications:
      - import_path: serve_app.app:build_app
        args: {model: demo, adapters: "id=path,...", dtype: float32, device: cpu, ...}

See serve_app/settings.py for every argument (TGI launcher names such as `model_id`,
`lora_adapters`, `max_total_tokens` are accepted too; `LORA_ADAPTERS` in the environment is the
fallback for `adapters`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from engine import missing_openmp_env
from models.resolve import resolve_model
from serve_app.deployments import Ingress, ModelReplica
from serve_app.settings import AppSettings, engine_config_to_dict

# Requests a model replica may hold beyond what its engine admits (info/health/metrics calls).
CONTROL_SLACK = 16


AFFINITY_ROUTER = "serve_app.router:AdapterAffinityRouter"
AGGREGATE_POLICY = "serve_app.autoscaling:AggregateLoadPolicy"
# AggregateLoadPolicy's constructor arguments, accepted at the top level of autoscaling_config too.
POLICY_KWARGS = ("target_load_per_replica", "downscale_headroom", "kv_pressure", "max_queue_wait_s")


def autoscaling_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Serve's autoscaling_config from the app args: the aggregate-load policy unless one is named.

    `{min_replicas: 1, max_replicas: 2, target_load_per_replica: 8}` is short for
    `{min_replicas: 1, max_replicas: 2, policy: {policy_function: AGGREGATE_POLICY,
    policy_kwargs: {target_load_per_replica: 8}}}`; an explicit `policy` is kept as given.
    """
    config = {k: v for k, v in raw.items() if k not in POLICY_KWARGS}
    shortcuts = {k: raw[k] for k in POLICY_KWARGS if k in raw}
    policy = dict(config.get("policy") or {})
    if not policy:
        policy = {"policy_function": AGGREGATE_POLICY}
    elif shortcuts and policy.get("policy_function", AGGREGATE_POLICY) != AGGREGATE_POLICY:
        raise ValueError(f"{sorted(shortcuts)} configure {AGGREGATE_POLICY}, not {policy['policy_function']}")
    if shortcuts:
        policy["policy_kwargs"] = {**dict(policy.get("policy_kwargs") or {}), **shortcuts}
    config["policy"] = policy
    return config


def deployment_options(settings: AppSettings, max_num_seqs: int, max_waiting: int,
                       waiting_slack: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve options for (ModelReplica, Ingress), sized so that Serve's own limits never decide first.

    Admission is the engine's: it holds the per-adapter state (queues, fair-share counters), so only
    it can refuse just the flooding adapter (429 + Retry-After at arrival, nothing queued) and keep
    everyone else's requests. Serve's limits know nothing of adapters: a request over a replica's
    `max_ongoing_requests` waits in the handle's queue, one FIFO shared by every adapter, and over
    `max_queued_requests` it gets a 429 whichever adapter it is for. So:

    - `max_ongoing_requests` covers all the engine can hold: `max_num_seqs` running + `max_waiting`
      waiting + `waiting_slack` (EngineConfig.waiting_slack: arrivals beyond max_waiting still taken
      from adapters under their share) + CONTROL_SLACK for info/health/metrics calls. A replica
      below it always takes the request, and the engine answers it: runs it, queues it in its
      adapter's queue, or refuses it at once. (A refusal is answered within milliseconds, so refused
      requests hold their place only for that long.)
    - `max_queued_requests` (= max_waiting) then only bounds what waits when every replica is at
      max_ongoing_requests, which the engine's own bounds keep from happening while replicas are up;
      what it still bounds is the queue while no replica is (all starting or restarting: Serve
      queues, BackPressureError -> 429 beyond it, the ingress's request_timeout_s -> 503 within it).
    - The ingress passes requests through without admission of its own: room for every model
      replica's max_ongoing_requests.
    """
    cuda = settings.device.startswith("cuda")
    gpus = settings.replica_num_gpus if settings.replica_num_gpus is not None else (1.0 if cuda else 0.0)
    actor: dict[str, Any] = {"num_cpus": settings.replica_num_cpus}
    # The engine's step thread and the replica's own thread both run OpenMP: without these libgomp
    # puts idle workers to sleep after each parallel region (engine/openmp_env.py). A value the
    # environment already sets (inherited by the workers) is kept.
    omp = missing_openmp_env()
    if omp and not cuda:
        actor["runtime_env"] = {"env_vars": omp}
    if gpus:
        actor["num_gpus"] = gpus
    ongoing = settings.max_ongoing_requests or (max_num_seqs + max_waiting + waiting_slack + CONTROL_SLACK)
    model: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": max_waiting,
    }
    if settings.autoscaling_config:
        model["autoscaling_config"] = autoscaling_config(settings.autoscaling_config)
        model["num_replicas"] = "auto"
        max_replicas = int(settings.autoscaling_config.get("max_replicas", settings.model_replicas))
    else:
        model["num_replicas"] = settings.model_replicas
        max_replicas = settings.model_replicas
    if settings.affinity_routing:
        model["request_router_config"] = {
            "request_router_class": AFFINITY_ROUTER,
            "request_router_kwargs": {
                "imbalance_threshold": settings.affinity_imbalance_threshold,
                # Remember own routing decisions until the replicas' advertisements have caught up.
                "recent_route_ttl_s": max(5.0, 3 * settings.routing_stats_period_s),
            },
            "request_routing_stats_period_s": settings.routing_stats_period_s,
            # A replica busy stepping the engine may answer late; stale stats are still useful.
            "request_routing_stats_timeout_s": max(5.0, 2 * settings.routing_stats_period_s),
        }
    # The ingress only parses and forwards: no CPU reservation, and room for every replica's requests.
    ingress = {
        "num_replicas": settings.ingress_replicas,
        "max_ongoing_requests": ongoing * max(1, max_replicas) // settings.ingress_replicas + CONTROL_SLACK,
        "ray_actor_options": {"num_cpus": 0},
    }
    return model, ingress


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    settings = AppSettings.from_args(args)
    # Resolve (and for "demo", build) the model now: a bad model id fails the deploy, not each replica.
    resolved = resolve_model(settings.model, settings.served_model_name)
    config = settings.engine_config(resolved.path, resolved.adapters + settings.adapters)
    config.validate()
    model_opts, ingress_opts = deployment_options(settings, config.max_num_seqs, config.max_waiting,
                                                  config.waiting_slack)
    torch_threads = settings.torch_threads or max(1, int(settings.replica_num_cpus))
    # The replica gets the explicit adapters only; it re-resolves the model (and its bundled adapters)
    # on its own node.
    replica_config = engine_config_to_dict(settings.engine_config(resolved.path, settings.adapters))
    options = {"torch_threads": torch_threads, "stream_messages_per_s": settings.stream_messages_per_s,
               "max_input_chars": settings.max_input_chars, "engine_process": settings.engine_process}
    model = ModelReplica.options(**model_opts).bind(replica_config, settings.model, settings.served_model_name,
                                                    options)
    return Ingress.options(**ingress_opts).bind(model, settings.max_body_bytes, settings.affinity_routing,
                                                settings.admin_config(), settings.request_timeout_s,
                                                settings.refusal_hold_s)
