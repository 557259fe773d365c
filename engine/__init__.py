"""Multi-LoRA serving engine: plain asyncio Python, no Ray, no HTTP.

These names are the engine's public surface: `serve_app/` imports nothing else from `engine`
(tests/test_engine_surface.py checks it).
"""

from engine.adapter_source import check_source
from engine.config import DTYPES, AdapterSpec, EngineConfig, parse_adapter_weights
from engine.engine import Engine
from engine.engine_process import EngineProcess
from engine.errors import (
    AdapterBusyError,
    AdapterLoadError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    NonFiniteOutputError,
    OverloadedError,
    QueueTimeoutError,
    RequestTimeoutError,
    UnknownAdapterError,
)
from engine.openmp_env import missing as missing_openmp_env
from engine.outputs import RequestOutput, TokenInfo, merge_outputs
from engine.sampling_params import (
    MAX_GRAMMAR_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOP_N_TOKENS,
    GrammarSpec,
    SamplingParams,
)
from engine.stats import NONFINITE_ADAPTERS_NAMED, AdapterPoolStats, EngineStats

__all__ = [
    "DTYPES",
    "MAX_GRAMMAR_CHARS",
    "MAX_STOP_SEQUENCES",
    "MAX_TOP_N_TOKENS",
    "NONFINITE_ADAPTERS_NAMED",
    "AdapterBusyError",
    "AdapterLoadError",
    "AdapterPoolStats",
    "AdapterSpec",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineProcess",
    "EngineStats",
    "GrammarSpec",
    "InvalidRequestError",
    "NonFiniteOutputError",
    "OverloadedError",
    "QueueTimeoutError",
    "RequestOutput",
    "RequestTimeoutError",
    "SamplingParams",
    "TokenInfo",
    "UnknownAdapterError",
    "check_source",
    "merge_outputs",
    "missing_openmp_env",
    "parse_adapter_weights",
]
