"""Multi-LoRA serving engine: plain asyncio Python, no Ray, no HTTP."""

from engine.config import AdapterSpec, EngineConfig
from engine.engine import Engine
from engine.errors import (
    AdapterLoadError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    UnknownAdapterError,
)
from engine.outputs import RequestOutput, TokenInfo
from engine.sampling_params import SamplingParams

__all__ = [
    "AdapterLoadError",
    "AdapterSpec",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "InvalidRequestError",
    "OverloadedError",
    "RequestOutput",
    "SamplingParams",
    "TokenInfo",
    "UnknownAdapterError",
]
