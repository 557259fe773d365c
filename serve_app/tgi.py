"""TGI's text-generation API end to end: request parsing into engine requests, responses, stream
events and `/info`, in TGI's schema (the routes that serve them are serve_app/http_app.py's).

Follows text-generation-inference's router (validation rules, `details`, stream events) closely
enough that `huggingface_hub.InferenceClient.text_generation` works against it unmodified.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine import MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS
from serve_app.engine_request import EngineRequest
from serve_app.errors import ApiError, ErrorInfo, tgi_error_body
from serve_app.grammar_params import tgi_grammar
from serve_app.streaming import sse
from serve_app.validation import (
    check_range,
    get_adapter_id,
    get_bool,
    get_float,
    get_int,
    get_stop,
    reject_unknown,
    require_object,
)

VERSION = "0.1.0"  # of this server, in /info
# TGI 1.x's default; TGI 2 fills the context instead, which on a random demo model means long waits.
DEFAULT_MAX_NEW_TOKENS = 100

PARAMETERS = {
    "adapter_id", "best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty", "grammar",
    "max_new_tokens", "repetition_penalty", "return_full_text", "seed", "stop", "temperature", "top_k",
    "top_n_tokens", "top_p", "truncate", "typical_p", "watermark",
}
TOP_LEVEL = {"inputs", "parameters", "stream"}


@dataclass
class TgiRequest:
    inputs: str
    adapter_id: str | None
    stream: bool
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    top_n_tokens: int
    truncate: int | None
    params: dict[str, Any] = field(default_factory=dict)
    compat: bool = False  # `POST /`, which answers a list (the Inference API's format), as TGI's compat route

    def engine_request(self, request_id: str, arrival: float) -> EngineRequest:
        return EngineRequest(
            request_id=request_id,
            adapter_id=self.adapter_id,
            prompt=self.inputs,
            params=self.params,
            default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
            truncate=self.truncate,
            details=self.details or self.decoder_input_details,
            arrival=arrival,
        )


def parse_request(body: Any, *, stream: bool | None) -> TgiRequest:
    """`stream` None: take it from the body (the `POST /` route); else the route decides."""
    body = require_object(body)
    reject_unknown(body, TOP_LEVEL, "request")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ApiError(f"inputs: must be a string, got {type(inputs).__name__}", field="inputs")
    if not inputs or inputs.isspace():  # not strip(): that would copy a multi-megabyte prompt
        raise ApiError("inputs: must not be empty", field="inputs")
    body_stream = get_bool(body, "stream")
    is_stream = bool(body_stream) if stream is None else stream
    raw = body.get("parameters")
    p: Mapping[str, Any] = {} if raw is None else require_object(raw, "parameters")
    reject_unknown(p, PARAMETERS, "parameters")

    # Features this server does not implement: refuse loudly instead of ignoring them.
    best_of = get_int(p, "best_of")
    if best_of is not None and best_of != 1:
        raise ApiError(f"best_of: values other than 1 are not supported, got {best_of}", field="best_of")
    if get_bool(p, "watermark"):
        raise ApiError("watermark: watermarking is not supported", field="watermark")

    # TGI's validation rules (router/src/validation.rs).
    temperature = get_float(p, "temperature")
    if temperature is not None and temperature <= 0:
        raise ApiError(f"temperature: must be strictly positive, got {temperature}", field="temperature")
    repetition_penalty = get_float(p, "repetition_penalty")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ApiError(f"repetition_penalty: must be strictly positive, got {repetition_penalty}",
                       field="repetition_penalty")
    frequency_penalty = get_float(p, "frequency_penalty")
    check_range("frequency_penalty", frequency_penalty, -2.0, 2.0)
    top_k = get_int(p, "top_k")
    if top_k is not None and top_k <= 0:
        raise ApiError(f"top_k: must be strictly positive, got {top_k}", field="top_k")
    top_p = get_float(p, "top_p")
    check_range("top_p", top_p, 0.0, 1.0, low_open=True, high_open=True)
    typical_p = get_float(p, "typical_p")
    check_range("typical_p", typical_p, 0.0, 1.0, low_open=True, high_open=True)
    max_new_tokens = get_int(p, "max_new_tokens")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ApiError(f"max_new_tokens: must be strictly positive, got {max_new_tokens}", field="max_new_tokens")
    seed = get_int(p, "seed", minimum=0, maximum=2**64 - 1)
    stop = get_stop(p, "stop", MAX_STOP_SEQUENCES, allow_str=False)
    truncate = get_int(p, "truncate")
    if truncate is not None and truncate <= 0:
        raise ApiError(f"truncate: must be strictly positive, got {truncate}", field="truncate")
    top_n_tokens = get_int(p, "top_n_tokens", minimum=0, maximum=MAX_TOP_N_TOKENS) or 0
    details = bool(get_bool(p, "details"))
    decoder_input_details = bool(get_bool(p, "decoder_input_details"))
    if is_stream and decoder_input_details:
        raise ApiError("decoder_input_details: `decoder_input_details` == true is not supported when streaming tokens",
                       field="decoder_input_details")
    return_full_text = bool(get_bool(p, "return_full_text"))
    adapter_id = get_adapter_id(p, "adapter_id")
    do_sample = bool(get_bool(p, "do_sample"))
    grammar = tgi_grammar(p.get("grammar"))

    # TGI samples when asked to or when any logits warper is set (temperature != 1, top-k/p, typical-p).
    warpers = (temperature not in (None, 1.0)) or top_k is not None or top_p is not None or typical_p is not None
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample or warpers,
        "temperature": temperature if temperature is not None else 1.0,
        "top_k": top_k or 0,
        "top_p": top_p if top_p is not None else 1.0,
        "typical_p": typical_p if typical_p is not None else 1.0,
        "repetition_penalty": repetition_penalty if repetition_penalty is not None else 1.0,
        "frequency_penalty": frequency_penalty or 0.0,
        "seed": seed,
        "stop": stop,
        "include_stop_str_in_output": True,  # TGI keeps the stop sequence in generated_text
        "top_n_tokens": top_n_tokens,
        "prompt_logprobs": decoder_input_details,
        "grammar": grammar,
    }
    return TgiRequest(
        inputs=inputs,
        adapter_id=adapter_id,
        stream=is_stream,
        details=details,
        decoder_input_details=decoder_input_details,
        return_full_text=return_full_text,
        top_n_tokens=top_n_tokens,
        truncate=truncate,
        params=params,
        compat=stream is None,
    )


def _prefill_token(t: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": t["id"], "text": t["text"], "logprob": t["logprob"]}


def generate_response(req: TgiRequest, result: Mapping[str, Any]) -> dict[str, Any]:
    """TGI's GenerateResponse: generated_text, plus details when asked for."""
    text = result["generated_text"]
    if req.return_full_text:
        text = req.inputs + text
    out: dict[str, Any] = {"generated_text": text}
    if req.details or req.decoder_input_details:
        details: dict[str, Any] = {
            "finish_reason": result["finish_reason"],
            "generated_tokens": result["generated_tokens"],
            "seed": result["seed"],
            "prefill": [_prefill_token(t) for t in result.get("prefill", [])],
            "tokens": list(result.get("tokens", [])),
        }
        if req.top_n_tokens:
            details["top_tokens"] = list(result.get("top_tokens", []))
        out["details"] = details
    return out


def generate_body(req: TgiRequest, result: Mapping[str, Any]) -> Any:
    """The body of a non-streamed answer: a GenerateResponse, in a list on the compat route."""
    body = generate_response(req, result)
    return [body] if req.compat else body


def result_headers(result: Mapping[str, Any], arrival: float) -> dict[str, str]:
    """TGI's x-prompt-tokens / x-generated-tokens / x-total-time (milliseconds since arrival) headers."""
    return {
        "x-prompt-tokens": str(result["prompt_tokens"]),
        "x-generated-tokens": str(result["generated_tokens"]),
        "x-total-time": str(int((time.time() - arrival) * 1000)),
    }


def stream_event(req: TgiRequest, index: int, delta: Mapping[str, Any]) -> dict[str, Any]:
    """One TGI StreamResponse: a token, and on the last one generated_text (+ details)."""
    token = dict(delta["token"] or {"id": 0, "text": "", "logprob": None, "special": True})
    # The text of a streamed token is what it adds to the output (the detokenizer's delta), so that
    # joining the streamed texts gives generated_text; a special token (EOS) shows itself, as in TGI.
    text = delta["text"]
    token["text"] = token["text"] if token["special"] and not text else text
    event: dict[str, Any] = {"index": index, "token": token}
    if req.top_n_tokens:
        event["top_tokens"] = delta.get("top_tokens") or []
    if delta["finished"]:
        generated = delta["generated_text"]
        event["generated_text"] = req.inputs + generated if req.return_full_text else generated
        event["details"] = (
            {
                "finish_reason": delta["finish_reason"],
                "generated_tokens": delta["generated_tokens"],
                "seed": delta["seed"],
                "input_length": delta["prompt_tokens"],
            }
            if req.details
            else None
        )
    else:
        event["generated_text"] = None
        event["details"] = None
    return event


class TgiStream:
    """The StreamEncoder (serve_app/streaming.py) of `/generate_stream`: one StreamResponse per token,
    an error event ({"error", "error_type"}) when the generation fails."""

    def __init__(self, req: TgiRequest) -> None:
        self.req = req
        self.index = 0

    def start(self) -> list[bytes]:
        return []

    def delta(self, delta: dict[str, Any]) -> list[bytes]:
        self.index += 1
        return [sse(stream_event(self.req, self.index, delta))]

    def error(self, info: ErrorInfo) -> list[bytes]:
        return [sse(tgi_error_body(info))]


def info_body(info: Mapping[str, Any]) -> dict[str, Any]:
    """TGI's `GET /info` from a replica's info (serve_app/core.py `ReplicaCore.info`)."""
    max_len = int(info["max_model_len"])
    return {
        "model_id": info["model_id"],
        "model_sha": None,
        "model_dtype": info["model_dtype"],
        "model_device_type": info["model_device_type"],
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": info["max_waiting"],
        "max_best_of": 1,
        "max_stop_sequences": info["max_stop_sequences"],
        "max_input_tokens": max_len - 1,
        "max_input_length": max_len - 1,
        "max_input_chars": info["max_input_chars"],
        "max_total_tokens": max_len,
        "max_new_tokens": info["max_new_tokens_limit"],
        "max_top_n_tokens": info["max_top_n_tokens"],
        "max_batch_size": info["max_num_seqs"],
        "max_batch_prefill_tokens": info["max_num_batched_tokens"],
        "max_client_batch_size": 1,
        "max_adapter_slots": info["max_adapter_slots"],
        "max_lora_rank": info["max_lora_rank"],
        "validation_workers": 0,
        "router": "loraserve (Ray Serve)",
        "version": VERSION,
        "sha": None,
        "docker_label": None,
        "adapters": [{"id": a["id"], "base_model_mismatch": bool(a.get("base_model_mismatch", False))}
                     for a in info["adapters"]],  # ids only: sources are the admin API's
    }
