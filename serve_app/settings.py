"""Application settings: the `args` of `config.yaml` (and the launcher's flags) parsed into one object.

Every key is checked: an unknown key is an error that lists the known ones, so a typo in
config.yaml fails at deploy time instead of silently running with a default.

`request_timeout_s` (default 60, like nginx's `proxy_read_timeout` in front of TGI) bounds how long
the ingress waits for a model replica: a non-streamed request must be answered within it, a
streamed one must get its first chunk within it and then each next chunk within it. A request
that waits longer (no replica reachable: all of them restarting, or one hung) is cancelled on the
replica and answered 503 with Retry-After, instead of waiting without bound. Raise it for long
non-streamed generations on slow hardware (or stream them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engine.config import DTYPES, AdapterSpec, EngineConfig
from serve_app.admin import AdminConfig, resolve_admin_token
from serve_app.http_guards import DEFAULT_MAX_BODY_BYTES

DEFAULT_REQUEST_TIMEOUT_S = 60.0  # `request_timeout_s`: see the module docstring

# Engine knobs that can be set from the app args, with the engine's own defaults.
ENGINE_KEYS: tuple[str, ...] = (
    "revision",
    "dtype",
    "device",
    "block_size",
    "num_kv_blocks",
    "kv_cache_bytes",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_waiting",
    "max_new_tokens_limit",
    "max_lora_rank",
    "max_adapter_slots",
    "lora_backend",
    "seed",
    "hub_cache_dir",
    # dynamic adapters and the adapter tiers (engine/adapter_pool.py; issue 5)
    "allow_dynamic_adapters",
    "adapter_source_roots",
    "host_cache_bytes",
    "preload_adapters",
)

# TGI's launcher names for the same knobs (so a TGI user's config or flags carry over).
ALIASES: dict[str, str] = {
    "model_id": "model",
    "lora_adapters": "adapters",
    "max_total_tokens": "max_model_len",
    "max_batch_prefill_tokens": "max_num_batched_tokens",
    "max_batch_size": "max_num_seqs",
    "max_concurrent_requests": "max_waiting",
    "num_replicas": "model_replicas",
}


def parse_adapters(value: Any) -> tuple[AdapterSpec, ...]:
    """Adapters as TGI spells them: "id=path,id2" (a string), a list of such strings, or dicts.

    A dict is {"id": ..., "path" | "source": ..., "revision": ...}.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return AdapterSpec.parse_list(value)
    if isinstance(value, Mapping):
        # {"id": "path", ...}: the compact YAML form.
        return tuple(AdapterSpec(str(k), str(v)) for k, v in value.items())
    if isinstance(value, Sequence):
        specs: list[AdapterSpec] = []
        for item in value:
            if isinstance(item, str):
                specs.extend(AdapterSpec.parse_list(item))
            elif isinstance(item, Mapping):
                adapter_id = item.get("id") or item.get("adapter_id")
                source = item.get("path") or item.get("source") or adapter_id
                if not adapter_id:
                    raise ValueError(f"adapter entry {dict(item)!r} has no 'id'")
                revision = item.get("revision")
                specs.append(AdapterSpec(str(adapter_id), str(source), str(revision) if revision else None))
            else:
                raise ValueError(f"adapter entries must be strings or mappings, got {item!r}")
        return tuple(specs)
    raise ValueError(f"adapters must be a string, a list or a mapping, got {type(value).__name__}")


@dataclass(frozen=True)
class AppSettings:
    """Everything `build_app` needs. Engine fields left at None keep the engine's defaults."""

    model: str = "demo"
    served_model_name: str | None = None
    adapters: tuple[AdapterSpec, ...] = ()
    # LORA_ADAPTERS fills in an empty `adapters`; false for an application on another base model
    # (config.yaml's zoo), which must not try to load adapters meant for the default one.
    adapters_from_env: bool = True
    engine: dict[str, Any] = field(default_factory=dict)
    # deployment shape
    model_replicas: int = 1
    ingress_replicas: int = 1
    replica_num_cpus: float = 1.0
    replica_num_gpus: float | None = None  # None: 1 when the device is CUDA, else 0
    torch_threads: int | None = None  # None: the replica's CPU count (what Ray gives it)
    stream_messages_per_s: float = 50.0  # streaming chunk budget per replica (serve_app/core.py); 0 = per token
    max_ongoing_requests: int | None = None  # None: derived from the engine's queue bounds
    # Serve autoscaling_config for ModelReplica (min/max_replicas, upscale/downscale_delay_s, ...).
    # Without a `policy` it gets serve_app.autoscaling:AggregateLoadPolicy; `target_load_per_replica`
    # etc. at its top level are moved into the policy's kwargs (see serve_app/app.py).
    autoscaling_config: dict[str, Any] | None = None
    # Adapter-affinity routing (serve_app/router.py); False: Serve's default power-of-two router.
    affinity_routing: bool = True
    affinity_imbalance_threshold: float = 8.0  # requests a holder may be busier than the least loaded
    routing_stats_period_s: float = 1.0  # how often replicas advertise resident adapters + load
    route_prefix: str = "/"  # where `python -m serve_app` mounts the app (config.yaml: the app's route_prefix)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # per request body, checked while it streams in (413 beyond)
    # Longest prompt in characters (chat: roles + contents), refused with 422/400 before tokenizing;
    # None: max_model_len x 8 (serve_app/core.py CHARS_PER_TOKEN_BOUND). Shown in /info.
    max_input_chars: int | None = None
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S  # the longest wait for a model replica
    # Adapter admin API (serve_app/admin.py): off by default; on, it needs a bearer token, from
    # `admin_token` or LORASERVE_ADMIN_TOKEN (resolved in from_args: enabled without one fails the deploy).
    admin_enabled: bool = False
    admin_token: str | None = field(default=None, repr=False)

    @property
    def device(self) -> str:
        return str(self.engine.get("device", "cpu"))

    @property
    def dtype(self) -> str:
        return str(self.engine.get("dtype", "float32"))

    @staticmethod
    def from_args(args: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> AppSettings:
        """Parse `config.yaml`'s `args` (or the launcher's flags). `LORA_ADAPTERS` fills in adapters."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        for key, value in (args or {}).items():
            canonical = ALIASES.get(key, key)
            if canonical in raw:
                raise ValueError(f"argument {key!r} given twice (also as {canonical!r})")
            raw[canonical] = value
        own = {f.name for f in fields(AppSettings)} - {"engine"}
        unknown = sorted(set(raw) - own - set(ENGINE_KEYS))
        if unknown:
            known = sorted(own | set(ENGINE_KEYS) | set(ALIASES))
            raise ValueError(f"unknown app argument(s) {unknown}; known: {known}")

        engine = {k: raw.pop(k) for k in ENGINE_KEYS if k in raw and raw[k] is not None}
        if "dtype" in engine and engine["dtype"] not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {engine['dtype']!r}")
        if "adapter_source_roots" in engine:  # YAML list or "a,b"; the engine config wants a tuple
            roots = engine["adapter_source_roots"]
            engine["adapter_source_roots"] = tuple(
                str(r).strip() for r in (roots.split(",") if isinstance(roots, str) else roots) if str(r).strip()
            )
        if "admin_enabled" in raw and not isinstance(raw["admin_enabled"], bool):
            raise ValueError(f"admin_enabled must be true or false, got {raw['admin_enabled']!r}")
        raw["admin_token"] = resolve_admin_token(bool(raw.get("admin_enabled")), raw.get("admin_token"), env)
        adapters_value = raw.pop("adapters", None)
        if "adapters_from_env" in raw and not isinstance(raw["adapters_from_env"], bool):
            raise ValueError(f"adapters_from_env must be true or false, got {raw['adapters_from_env']!r}")
        if adapters_value in (None, "", []) and env.get("LORA_ADAPTERS") and raw.get("adapters_from_env", True):
            adapters_value = env["LORA_ADAPTERS"]
        kwargs: dict[str, Any] = {k: v for k, v in raw.items() if v is not None}
        kwargs["model"] = str(kwargs.get("model", "demo"))
        for name in ("model_replicas", "ingress_replicas", "max_body_bytes", "max_input_chars"):
            if name in kwargs and (isinstance(kwargs[name], bool) or not isinstance(kwargs[name], int)
                                   or kwargs[name] < 1):
                raise ValueError(f"{name} must be a positive integer, got {kwargs[name]!r}")
        timeout = kwargs.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise ValueError(f"request_timeout_s must be a positive number of seconds, got {timeout!r}")
        settings = AppSettings(adapters=parse_adapters(adapters_value), engine=engine, **kwargs)
        # Fail here, in the builder, rather than in every replica's constructor.
        settings.engine_config(settings.model, settings.adapters).validate()
        return settings

    def engine_config(self, model_path: str, adapters: tuple[AdapterSpec, ...]) -> EngineConfig:
        return EngineConfig(model=model_path, adapters=adapters, **self.engine)

    def admin_config(self) -> AdminConfig:
        """What the ingress needs to guard /adapters (the roots are the engine's, so both check alike)."""
        return AdminConfig(self.admin_enabled, self.admin_token, tuple(self.engine.get("adapter_source_roots", ())))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapters"] = [asdict(a) for a in self.adapters]
        if out.get("admin_token"):
            out["admin_token"] = "***"  # printed by the launcher and logs: never the secret
        return out


def engine_config_to_dict(config: EngineConfig) -> dict[str, Any]:
    """A plain dict (picklable, JSON-able) that `engine_config_from_dict` turns back into the config."""
    out = asdict(config)
    out["adapters"] = [asdict(a) for a in config.adapters]
    return out


def engine_config_from_dict(data: Mapping[str, Any]) -> EngineConfig:
    data = dict(data)
    data["adapters"] = tuple(AdapterSpec(**a) for a in data.get("adapters", ()))
    data["adapter_source_roots"] = tuple(data.get("adapter_source_roots", ()))
    return EngineConfig(**data)
