"""Per-request sampling parameters, validated once at the door."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

MAX_STOP_SEQUENCES = 16
MAX_TOP_N_TOKENS = 20
GRAMMAR_TYPES = ("json", "regex")
# A grammar's text (a JSON schema serialized, or a regex) is compiled per distinct value; compile time
# grows with its size, and engine/grammar.py bounds that time too. 64 KiB holds any schema a person writes.
MAX_GRAMMAR_CHARS = 65_536


@dataclass(frozen=True)
class GrammarSpec:
    """Structured output for one request: `type` "json" (value: a JSON schema, serialized) or "regex"."""

    type: str
    value: str

    def validate(self) -> None:
        if self.type not in GRAMMAR_TYPES:
            raise InvalidRequestError("grammar", f"type must be one of {list(GRAMMAR_TYPES)}, got {self.type!r}")
        if not isinstance(self.value, str):
            raise InvalidRequestError("grammar", f"value must be a string, got {type(self.value).__name__}")
        if len(self.value) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(
                "grammar", f"value must have at most {MAX_GRAMMAR_CHARS} characters, given: {len(self.value)}"
            )
        if self.type == "regex" and not self.value:
            raise InvalidRequestError("grammar", "a regex grammar must not be empty")


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. temperature == 0 or do_sample False means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    do_sample: bool = False
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False  # TGI keeps the stop string, OpenAI and vLLM cut it
    ignore_eos: bool = False
    logprobs: bool = True  # logprob of each chosen token (cheap; TGI always returns it in details)
    top_n_tokens: int = 0
    prompt_logprobs: bool = False  # logprobs of the prompt tokens (TGI decoder_input_details)
    grammar: GrammarSpec | None = None  # constrain the output to a JSON schema or a regex

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int) -> None:
        def bad(name: str, message: str) -> InvalidRequestError:
            return InvalidRequestError(name, message)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise bad("max_new_tokens", f"must be an integer, got {self.max_new_tokens!r}")
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise bad("max_new_tokens", f"must be between 1 and {max_new_tokens_limit}, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 = disabled), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.typical_p <= 1.0:
            raise bad("typical_p", f"must be in (0, 1], got {self.typical_p}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise bad("repetition_penalty", f"must be in (0, 100], got {self.repetition_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise bad("seed", f"must be in [0, 2^64), got {self.seed}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise bad("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "stop sequences must be non-empty strings")
        if not 0 <= self.top_n_tokens <= MAX_TOP_N_TOKENS:
            raise bad("top_n_tokens", f"must be in [0, {MAX_TOP_N_TOKENS}], got {self.top_n_tokens}")
        if self.grammar is not None:
            if not isinstance(self.grammar, GrammarSpec):
                raise bad("grammar", f"must be a GrammarSpec, got {type(self.grammar).__name__}")
            self.grammar.validate()
            if self.ignore_eos:  # a finished grammar allows only EOS: ignoring it would leave no token
                raise bad("grammar", "cannot be combined with ignore_eos")
