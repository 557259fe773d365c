"""Application settings: the `args` of `config.yaml` (and the launcher's flags) parsed into one object.

Every key is checked: an unknown key is an error that lists the known ones, so a typo in
config.yaml fails at deploy time instead of silently running with a default; a value of the wrong
type (`max_num_seqs: "many"`, `preload_adapters: "no"`) is an error naming the key.

Engine keys are the fields of `engine.EngineConfig` (everything but `model` and `adapters`; see
`ENGINE_KEYS`), with the engine's own defaults and meanings (engine/config.py documents
each). An omitted key, or `null`, keeps the engine's default, except where the engine accepts None
as a value of its own: `max_queue_wait_s: null` turns that deadline off. The engine's
`request_timeout_s` is spelled `engine_request_timeout_s` here, because `request_timeout_s` is the
ingress's (below).

| key | default | what |
| --- | --- | --- |
| model | demo | base model: `smollm2`, `zoo`, `demo`, a local HF model dir or a Hub id |
| served_model_name | the model id | the base model's public name (`/info`, OpenAI `model`) |
| adapters | "" | `id=path,id2=path2` (TGI's LORA_ADAPTERS), a list, or `{id: path}`; LORA_ADAPTERS fills an empty one |
| revision, dtype, device, seed, load_format, hub_cache_dir | engine | the base model and where it runs |
| block_size, num_kv_blocks, kv_cache_bytes, max_model_len | engine | the paged KV cache, per replica |
| enable_prefix_caching | true | reuse the K/V of full blocks of a prompt prefix already computed by the same adapter identity |
| max_num_seqs, max_num_batched_tokens, max_new_tokens_limit | engine | batching: seats and the per-step token budget |
| max_waiting | 1024 | waiting requests per replica (all adapters); beyond it (and its slack): 429 |
| **scheduling_policy** | fair | `fair` (token-fair across adapters, S-LoRA's VTC) or `round_robin` |
| **adapter_weights** | {} | service weight per adapter: `"sql=2,chat=1"` or `{sql: 2}` (`""` = the base model), 1 otherwise |
| **prefill_token_cost**, **decode_token_cost** | 1, 2 | what a prompt / generated token costs in the fairness counters |
| **max_waiting_per_adapter** | null | waiting requests one adapter may hold; beyond it only that adapter gets 429 |
| **max_waiting_slack** | max_waiting / 8 | arrivals beyond max_waiting still accepted from adapters under their share |
| under_share_prefill_first, long_prefill_token_threshold | true, 0 | light adapters' first token beside floods (engine) |
| **max_queue_wait_s** | 60 | no first token this long after arrival: 503 + Retry-After, everything freed (null: off) |
| **engine_request_timeout_s** | null | a request still running this long after arrival is stopped: 504 (TGI and vLLM: none) |
| **adapter_load_timeout_s** | 60 | an adapter load (read, download, validation) taking longer fails its requests (424) |
| max_lora_rank, max_adapter_slots, host_cache_bytes | engine | adapter tiers: device slots and the host LRU cache |
| allow_dynamic_adapters, adapter_source_roots, preload_adapters, adapter_failure_ttl_s, lora_backend | engine | adapter loading |
| model_replicas, ingress_replicas, replica_num_cpus, replica_num_gpus, torch_threads | 1, 1, 1, auto, auto | deployment shape |
| engine_process | false | true: the engine runs in a process of its own beside the replica's (engine/engine_process.py), so its step thread never waits for the GIL of Serve's threads |
| max_ongoing_requests | derived | Serve's per-replica limit; derived so that it never decides first (serve_app/app.py) |
| autoscaling_config | none | Serve's autoscaling_config; the aggregate-load policy by default (serve_app/app.py) |
| affinity_routing, affinity_imbalance_threshold, routing_stats_period_s | true, 8, 1 | adapter-affinity routing |
| stream_messages_per_s | 50 | streamed chunks/s per replica, all streams together (0: one per token) |
| max_body_bytes, max_input_chars | 2000000, max_model_len x 8 | request size limits (413 / 422) |
| request_timeout_s | 60 | the ingress's longest wait for a model replica (below) |
| refusal_hold_s | 0.25 | after a replica refuses an adapter (429), the ingress answers its next requests itself this long, or until one of them ends (serve_app/admission_gate.py; 0: off) |
| admin_enabled, admin_token | false, LORASERVE_ADMIN_TOKEN | the adapter admin API (serve_app/admin.py) |
| route_prefix, adapters_from_env | /, true | where the launcher mounts the app; whether LORA_ADAPTERS applies |

TGI's launcher names work too (`ALIASES`): model_id, lora_adapters, max_total_tokens,
max_batch_prefill_tokens, max_batch_size, max_concurrent_requests, num_replicas.

`request_timeout_s` (default 60, like nginx's `proxy_read_timeout` in front of TGI) bounds how long
the ingress waits for a model replica: a non-streamed request must be answered within it, a
streamed one must get its first chunk within it and then each next chunk within it. A request
that waits longer (no replica reachable: all of them restarting, or one hung) is cancelled on the
replica and answered 503 with Retry-After, instead of waiting without bound. Raise it for long
non-streamed generations on slow hardware (or stream them). Keep it above `max_queue_wait_s` (as the
defaults are equal, a request queued in the engine meets the engine's clearer 503 first, within
a step of the deadline) and above `engine_request_timeout_s` when one is set.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from engine import DTYPES, AdapterSpec, EngineConfig, parse_adapter_weights
from serve_app.admin import AdminConfig, resolve_admin_token
from serve_app.admission_gate import DEFAULT_HOLD_S, check_hold_s
from serve_app.http_guards import DEFAULT_MAX_BODY_BYTES

DEFAULT_REQUEST_TIMEOUT_S = 60.0  # `request_timeout_s`: see the module docstring
BOOL_SETTINGS = ("admin_enabled", "adapters_from_env", "engine_process")  # true or false, nothing else

# Engine fields that are not operator knobs of the app: the model and adapters are app keys of their
# own (resolved by models/resolve.py).
_NOT_ENGINE_KEYS = frozenset({"model", "adapters"})
# Engine fields whose app key differs, because the plain name is an app key with another meaning.
ENGINE_FIELD_KEYS: dict[str, str] = {"request_timeout_s": "engine_request_timeout_s"}
_ENGINE_HINTS = get_type_hints(EngineConfig)
# app key -> EngineConfig field: every engine knob, derived from the dataclass (one list to maintain).
ENGINE_KEY_FIELDS: dict[str, str] = {
    ENGINE_FIELD_KEYS.get(f.name, f.name): f.name for f in fields(EngineConfig) if f.name not in _NOT_ENGINE_KEYS
}
ENGINE_KEYS: tuple[str, ...] = tuple(ENGINE_KEY_FIELDS)
# Keys where `null` is a value of its own (the engine's default is not None but None is allowed: "off").
NULL_TURNS_OFF: frozenset[str] = frozenset(
    key for key, name in ENGINE_KEY_FIELDS.items()
    if type(None) in get_args(_ENGINE_HINTS[name])
    and next(f for f in fields(EngineConfig) if f.name == name).default is not None
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


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def engine_value(key: str, value: Any) -> Any:
    """`value` of app key `key` as its EngineConfig field's type (YAML and flag spellings accepted), or
    ValueError naming the key. Ranges are the engine's to check (EngineConfig.validate)."""
    hint = _ENGINE_HINTS[ENGINE_KEY_FIELDS[key]]
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # YAML's 5.12e8
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # a revision YAML read as a number
            return str(value)
    elif get_origin(hint) is tuple:  # a YAML list or "a,b"
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, Sequence) and not isinstance(items, str | bytes):
            return tuple(str(item).strip() for item in items if str(item).strip())
    elif get_origin(hint) is dict and key == "adapter_weights":
        return _adapter_weights(value)
    else:
        return value
    raise ValueError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _adapter_weights(value: Any) -> dict[str, float]:
    """adapter_weights as `"id=2,id2=1"` (the launcher's flag) or a YAML mapping ("" = the base model)."""
    if isinstance(value, str):
        return parse_adapter_weights(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"adapter_weights must be 'id=weight,...' or a mapping of id to weight, got {value!r}")
    weights: dict[str, float] = {}
    for adapter_id, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"adapter_weights[{adapter_id!r}] must be a number > 0, got {weight!r}")
        weights["" if adapter_id is None else str(adapter_id)] = float(weight)
    return weights


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
    # True: the engine in a process of its own beside each replica's (engine/engine_process.py), its
    # step thread never waiting for the GIL that Serve's loops and threads hold. Off by default: on
    # 2 shared cores it measured no better (README, noisy neighbours), the cores being the limit.
    engine_process: bool = False
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
    # After an adapter-scoped 429 from a replica, the ingress answers that adapter's requests itself for
    # up to this long (serve_app/admission_gate.py): the flood's refusals stop costing the replica.
    refusal_hold_s: float = DEFAULT_HOLD_S
    # Adapter admin API (serve_app/admin.py): off by default; on, it needs a bearer token, from
    # `admin_token` or LORASERVE_ADMIN_TOKEN (resolved in from_args: enabled without one fails the deploy).
    admin_enabled: bool = False
    admin_token: str | None = field(default=None, repr=False)

    @property
    def device(self) -> str:
        return str(self.engine.get("device", "cpu"))

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

        engine: dict[str, Any] = {}
        for key in ENGINE_KEYS:
            if key not in raw:
                continue
            value = raw.pop(key)
            if value is None and key not in NULL_TURNS_OFF:
                continue  # null: the engine's default
            engine[ENGINE_KEY_FIELDS[key]] = engine_value(key, value)
        if "dtype" in engine and engine["dtype"] not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {engine['dtype']!r}")
        for name in BOOL_SETTINGS:
            if name in raw and not isinstance(raw[name], bool):
                raise ValueError(f"{name} must be true or false, got {raw[name]!r}")
        raw["admin_token"] = resolve_admin_token(bool(raw.get("admin_enabled")), raw.get("admin_token"), env)
        adapters_value = raw.pop("adapters", None)
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
        check_hold_s(kwargs.get("refusal_hold_s", DEFAULT_HOLD_S))
        settings = AppSettings(adapters=parse_adapters(adapters_value), engine=engine, **kwargs)
        # Fail here, in the builder, rather than in every replica's constructor.
        try:
            settings.engine_config(settings.model, settings.adapters).validate()
        except ValueError as exc:  # the engine names its field; the user wrote the app key
            message = str(exc)
            for name, key in ENGINE_FIELD_KEYS.items():
                if message.startswith(name):
                    message = key + message[len(name):]
            raise ValueError(message) from None
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
