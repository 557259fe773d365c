"""Multi-LoRA serving engine: plain asyncio Python, no Ray, no HTTP."""

from engine.adapter_source import check_source
from engine.config import AdapterSpec, EngineConfig
from engine.engine import Engine
from engine.errors import (
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
from engine.outputs import RequestOutput, TokenInfo
from engine.sampling_params import GrammarSpec, SamplingParams

__all__ = [
    "AdapterLoadError",
    "AdapterSpec",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
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
]
