"""What crosses back from a model replica to the ingress: a request's outputs as plain dicts.

The counterpart of serve_app/engine_request.py. `result_dict` is a finished request's result (the
non-streaming routes), `delta_dict` one streamed output (the chunks serve_app/streaming.py turns
into events); the protocol files (serve_app/tgi.py, serve_app/openai_api.py) read these fields.
Plain dicts: cheap to pickle through Ray, no engine classes needed on the ingress.
"""

from __future__ import annotations

import math
from typing import Any

from engine import RequestOutput, TokenInfo


def token_dict(token: TokenInfo) -> dict[str, Any]:
    lp = token.logprob
    # JSON has no NaN/inf: an impossible token (filtered by top-k/top-p) reports null.
    return {"id": token.id, "text": token.text, "logprob": lp if lp is not None and math.isfinite(lp) else None,
            "special": token.special}


def result_dict(final: RequestOutput, details: bool) -> dict[str, Any]:
    """A finished request's result; with `details`, every token's, the alternatives' and the prompt's."""
    result = _final_fields(final)
    result["token_ids"] = list(final.token_ids)
    if details:
        result.update(tokens=[token_dict(t) for t in final.tokens],
                      top_tokens=[[token_dict(t) for t in alts] for alts in final.top_tokens],
                      prefill=[token_dict(t) for t in final.prefill])
    return result


def delta_dict(out: RequestOutput) -> dict[str, Any]:
    """One streamed output: its new text and token; the last one also carries the final fields."""
    delta: dict[str, Any] = {
        "text": out.text,
        "token": token_dict(out.tokens[-1]) if out.tokens else None,
        "top_tokens": [token_dict(t) for t in out.top_tokens[-1]] if out.top_tokens else None,
        "finished": out.finished,
    }
    if out.finished:
        delta.update(_final_fields(out))
    return delta


def _final_fields(out: RequestOutput) -> dict[str, Any]:
    return {
        "finish_reason": out.finish_reason,
        "generated_text": out.generated_text or "",
        "generated_tokens": out.generated_tokens,
        "prompt_tokens": out.prompt_tokens,
        "seed": out.seed,
    }
