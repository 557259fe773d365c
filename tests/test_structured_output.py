"""Structured output (issue 16): per-request JSON-schema / regex grammars in mixed-adapter batches.

- The mask: its application equals a per-bit reference and leaves rows without a grammar bit-identical;
  the vocabulary given to xgrammar never lets a special token (BOS, pad, `<|im_start|>`) into a JSON
  string, on the zoo's byte-level tokenizer, a SentencePiece-style (metaspace + byte fallback) one and
  SmolLM2's.
- The engine on the demo zoo (30 adapters): a mixed batch where each request has its own grammar (or
  none) and its own adapter; every grammar output validates (jsonschema), every request without one is
  token-identical to a run without grammar batch-mates; a grammar that cannot finish ends with
  `length`, a finished one with `eos_token`; seeds reproduce; recompute preemption keeps the grammar.
- Compiling: bad schemas and regexes are InvalidRequestErrors naming the problem (no C++ paths),
  unsupported keywords are refused, one compile per distinct grammar (cache, shared in-flight
  compiles, bounded), a hostile grammar is stopped at the time limit and the engine keeps decoding.
- HTTP through the in-process app: TGI `parameters.grammar` on /generate and /generate_stream,
  OpenAI `response_format` on /v1/completions and /v1/chat/completions, the error shapes.
- Slow: huggingface_hub.InferenceClient and the openai client, unmodified, against a real local
  server (uvicorn on 127.0.0.1); the 200-request bar over the zoo and the SmolLM2 showcase adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch

from engine import AdapterSpec, Engine, EngineConfig, InvalidRequestError, SamplingParams
from engine.grammar import GrammarCompiler, json_vocab_filter, tokenizer_info
from engine.grammar_mask import GrammarMask, MaskFiller
from engine.sampling_params import MAX_GRAMMAR_CHARS, GrammarSpec
from loadtests.bench_grammar import BAR_GRAMMARS, BAR_REGEX, BAR_SCHEMAS, check_output
from serve_app.backends import LocalBackend
from serve_app.core import ReplicaCore
from serve_app.http_app import create_app

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "models" / "zoo"
sys.path.insert(0, str(REPO / "models" / "scripts"))
from zoo_tasks import TASKS, held_out, prompt  # noqa: E402

HTTP_ADAPTERS = ("uppercase", "lowercase", "rot13", "reverse", "caesar-3", "sort-letters")
ZOO_MAX_NEW = 72  # the zoo's context is 128 byte tokens; the bar's outputs take at most ~60
ANSWER = BAR_GRAMMARS["answer"]
# A regex whose compiled grammar takes seconds (alternatives of growing counted repeats): the hostile case.
# Compiles and serializes in ~9 s (a ~220 MB automaton) on the 2-core dev machine even when it is idle:
# well past the test's 2 s compile timeout, so the timeout path is taken however fast the machine is.
HOSTILE_REGEX = "(" + "|".join(f"[a-z]{{{i}}}x" for i in range(1, 240)) + ")*"


def json_spec(schema: Any) -> GrammarSpec:
    return GrammarSpec("json", json.dumps(schema))


def bit_allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_engine() -> Iterator[Engine]:
    assert (ZOO / "base" / "model.safetensors").is_file(), "models/zoo is missing: run models/scripts/train_zoo.py"
    engine = Engine(EngineConfig(
        model=str(ZOO / "base"), adapters=tuple(AdapterSpec(t.name, str(ZOO / "adapters" / t.name)) for t in TASKS),
        max_adapter_slots=len(TASKS), max_lora_rank=16, max_num_seqs=256, max_num_batched_tokens=4096,
        num_kv_blocks=1024, max_waiting=4096,
    ))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def zoo_core() -> Iterator[ReplicaCore]:
    config = EngineConfig(model=str(ZOO / "base"),
                          adapters=tuple(AdapterSpec(name, str(ZOO / "adapters" / name)) for name in HTTP_ADAPTERS),
                          max_adapter_slots=6, max_lora_rank=16, num_kv_blocks=256)
    core = ReplicaCore(config, "zoo")
    yield core
    core.shutdown()


def complete_all(engine: Engine, jobs: list[tuple[str, str | None, SamplingParams]]) -> list[Any]:
    async def go() -> list[Any]:
        return list(await asyncio.gather(*(engine.complete(p, params, adapter_id=a) for p, a, params in jobs)))

    return asyncio.run(go())


def zoo_jobs(n_per_task: int, seed: int) -> list[tuple[str, str | None]]:
    jobs: list[tuple[str, str | None]] = []
    for t in TASKS:
        jobs += [(prompt(x), t.name) for x in held_out(t, n_per_task, seed)]
    jobs += [(prompt(x), None) for x in held_out(TASKS[0], n_per_task, seed + 1)]
    return jobs


# ---- the mask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [[0, 2, 5], [0, 1, 2, 3, 4, 5]])
def test_mask_apply_matches_a_per_bit_reference(rows: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    logits = torch.randn(6, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), (vocab + 31) // 32), generator=gen, dtype=torch.int32)
    masked = logits.clone()
    GrammarMask(torch.tensor(rows), bitmask, all_rows=len(rows) == 6).apply(masked)
    for i in range(6):
        if i not in rows:
            assert torch.equal(masked[i], logits[i])  # untouched, bit for bit
            continue
        j = rows.index(i)
        expected = torch.tensor([logits[i, t].item() if bit_allowed(bitmask, j, t) else float("-inf")
                                 for t in range(vocab)])
        assert torch.equal(masked[i], expected)


def _string_mask(info: Any, vocab_size: int) -> torch.Tensor:
    """The mask one step inside a JSON string value (`{"a": "x`), the vocabulary filter applied."""
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps({"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"]}),
        any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string('{"a": "x')
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    matcher.fill_next_token_bitmask(bitmask)
    return bitmask & json_vocab_filter(info)


def _tokenizer_cases(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Any, int]]:
    from transformers import AutoTokenizer

    from models.synthetic import build_tokenizer

    cases = [("zoo byte-level", AutoTokenizer.from_pretrained(ZOO / "base"), 259)]
    metaspace = tmp_path_factory.mktemp("metaspace")
    build_tokenizer(metaspace, vocab_size=400, style="metaspace")
    tok = AutoTokenizer.from_pretrained(metaspace)
    cases.append(("metaspace + byte fallback", tok, len(tok) + 7))  # a padded lm_head, as some models have
    from models.resolve import resolve_model

    with contextlib.suppress(Exception):  # SmolLM2 is converted from an optional package
        smol = AutoTokenizer.from_pretrained(resolve_model("smollm2").path)
        cases.append(("SmolLM2", smol, len(smol)))
    return cases


def test_tokenizer_info_keeps_special_tokens_out_of_json(tmp_path_factory: pytest.TempPathFactory) -> None:
    for name, tok, vocab_size in _tokenizer_cases(tmp_path_factory):
        info = tokenizer_info(tok, vocab_size, [tok.eos_token_id])
        assert int(info.vocab_size) == vocab_size, name
        mask = _string_mask(info, vocab_size)
        for special in tok.all_special_ids:
            assert not bit_allowed(mask, 0, special), (name, tok.convert_ids_to_tokens(special))
        for token_id in range(len(tok), vocab_size):  # padding rows of the lm_head: never
            assert not bit_allowed(mask, 0, token_id), (name, token_id)
        letter = tok.encode("q", add_special_tokens=False)[-1]
        assert bit_allowed(mask, 0, letter), name  # ordinary text is allowed in a string
        tab = [t for t in range(len(tok)) if "\t" in tok.decode([t])]
        assert all(not bit_allowed(mask, 0, t) for t in tab), name  # raw control bytes are not JSON


# ---- the engine on the zoo -----------------------------------------------------------------------
def test_mixed_batch_each_request_its_own_grammar_and_adapter(zoo_engine: Engine) -> None:
    jobs = zoo_jobs(1, seed=7)  # 30 adapters + base
    names = list(BAR_GRAMMARS)
    plain = SamplingParams(max_new_tokens=ZOO_MAX_NEW)
    alone = complete_all(zoo_engine, [(p, a, plain) for p, a in jobs])
    # Every request twice in one batch: once with a grammar (rotating over the six), once without.
    mixed_jobs = [(p, a, SamplingParams(max_new_tokens=ZOO_MAX_NEW, grammar=BAR_GRAMMARS[names[i % len(names)]]))
                  for i, (p, a) in enumerate(jobs)] + [(p, a, plain) for p, a in jobs]
    mixed = complete_all(zoo_engine, mixed_jobs)
    constrained, unconstrained = mixed[: len(jobs)], mixed[len(jobs):]
    for i, out in enumerate(constrained):
        check_output(names[i % len(names)], out.generated_text)
        assert out.finish_reason == "eos_token"
        assert out.token_ids[-1] in zoo_engine.eos_token_ids
    for ref, out in zip(alone, unconstrained):
        assert out.token_ids == ref.token_ids  # batch-mates with grammars change nothing
    assert zoo_engine.stats().grammars["cached"] >= len(names)
    zoo_engine.check_idle_invariants()


def test_a_grammar_that_cannot_finish_ends_with_length(zoo_engine: Engine) -> None:
    out = complete_all(zoo_engine, [(prompt("hello"), "reverse", SamplingParams(max_new_tokens=6, grammar=ANSWER))])[0]
    assert out.finish_reason == "length" and out.generated_tokens == 6
    assert out.generated_text == '{"answ'  # a prefix of the only way the grammar can start
    regex = GrammarSpec("regex", "ab(c|d)+")  # finished after "abc" but may go on: EOS becomes allowed
    out = complete_all(zoo_engine, [(prompt("abc"), None, SamplingParams(max_new_tokens=40, grammar=regex))])[0]
    assert re.fullmatch("ab(c|d)+", out.generated_text) and out.finish_reason in ("eos_token", "length")


def test_sampling_with_a_grammar_is_valid_and_seeded(zoo_engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=ZOO_MAX_NEW, do_sample=True, temperature=1.3, top_p=0.95, seed=1234,
                            repetition_penalty=1.2, grammar=BAR_GRAMMARS["person"])
    first = complete_all(zoo_engine, [(prompt("lora"), "rot13", params)] * 3)
    again = complete_all(zoo_engine, [(prompt("lora"), "rot13", params)])
    for out in first + again:
        check_output("person", out.generated_text)
    assert {out.token_ids for out in first + again} == {first[0].token_ids}


def test_grammar_survives_recompute_preemption() -> None:
    """A KV cache too small for every request: sequences are preempted and recomputed mid-grammar."""
    engine = Engine(EngineConfig(model=str(ZOO / "base"), adapters=(AdapterSpec("reverse", str(ZOO / "adapters" / "reverse")),),
                                 max_adapter_slots=1, max_lora_rank=16, num_kv_blocks=12, block_size=8,
                                 max_num_seqs=16, max_queue_wait_s=None))
    try:
        jobs = [(prompt(x), "reverse", SamplingParams(max_new_tokens=64, grammar=BAR_GRAMMARS["person"]))
                for x in held_out(TASKS[0], 8, seed=3)]
        outs = complete_all(engine, jobs)
        assert engine.stats().preemptions > 0
        solo = [complete_all(engine, [job])[0] for job in jobs[:3]]
    finally:
        engine.shutdown()
    for out in outs:
        check_output("person", out.generated_text)
    assert [o.token_ids for o in outs[:3]] == [o.token_ids for o in solo]


# ---- compiling -----------------------------------------------------------------------------------
BAD_GRAMMARS: list[tuple[GrammarSpec, str]] = [
    (GrammarSpec("json", '{"type": "strin"}'), 'Unsupported type "strin"'),
    (GrammarSpec("json", '{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum greater than maximum"),
    (GrammarSpec("json", '{"$ref": "#/$defs/missing"}'), "missing"),
    (GrammarSpec("json", "false"), "cannot accept any value"),
    (GrammarSpec("json", "[1, 2]"), "should be an object or bool"),
    (GrammarSpec("json", '{"type": "array", "uniqueItems": true}'), "'uniqueItems' (at #) is not supported"),
    (json_spec({"properties": {"if": {"type": "object", "properties": {"x": {"if": {}}}}}}),
     "'if' (at #/properties/if/properties/x) is not supported"),
    (json_spec({"type": "string", "pattern": "^a+$", "maxLength": 3}), "put the length into the pattern"),
    (GrammarSpec("regex", "(["), "invalid regex: Regex parsing error at position 3: Unclosed '['"),
    (GrammarSpec("regex", "(?<=a)b"), "Lookbehind is not supported"),
    (GrammarSpec("regex", ""), "must not be empty"),
    (GrammarSpec("yaml", "a: b"), "type must be one of ['json', 'regex']"),
    (GrammarSpec("json", " " * (MAX_GRAMMAR_CHARS + 1)), f"at most {MAX_GRAMMAR_CHARS} characters"),
]


@pytest.mark.parametrize(("spec", "needle"), BAD_GRAMMARS, ids=[n[:40] for _, n in BAD_GRAMMARS])
def test_bad_grammars_name_the_problem(zoo_engine: Engine, spec: GrammarSpec, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        complete_all(zoo_engine, [(prompt("x"), None, SamplingParams(max_new_tokens=4, grammar=spec))])
    message = str(info.value)
    assert info.value.field == "grammar" and message.startswith("grammar: ") and needle in message, message
    assert ".cc" not in message and "/project" not in message  # no C++ source locations


def test_grammar_with_ignore_eos_is_refused(zoo_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        complete_all(zoo_engine, [(prompt("x"), None, SamplingParams(grammar=ANSWER, ignore_eos=True))])


def test_one_compile_per_distinct_grammar(zoo_engine: Engine) -> None:
    spec = json_spec({"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["k"]})
    before = zoo_engine.stats().grammars
    outs = complete_all(zoo_engine, [(prompt(x), "reverse", SamplingParams(max_new_tokens=16, grammar=spec))
                                     for x in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")])
    after = zoo_engine.stats().grammars
    assert after["compiles"] == before["compiles"] + 1  # 8 requests at once, one compile
    assert after["hits"] >= before["hits"] + 7
    for out in outs:
        jsonschema.validate(json.loads(out.generated_text), json.loads(spec.value))


def test_compiled_grammar_cache_is_bounded() -> None:
    from transformers import AutoTokenizer

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(ZOO / "base"), 259, [257], max_entries=2)
    try:
        specs = [GrammarSpec("regex", f"[a-z]{{{n}}}") for n in (1, 2, 3)]
        for spec in specs:
            compiler.compile(spec)
        assert compiler.stats()["cached"] == 2 and compiler.stats()["compiles"] == 3
        compiler.compile(specs[2])  # the most recent two stay
        assert compiler.stats()["compiles"] == 3
        compiler.compile(specs[0])  # the oldest was evicted
        assert compiler.stats()["compiles"] == 4
    finally:
        compiler.close()


def test_hostile_grammar_is_stopped_and_the_engine_keeps_decoding() -> None:
    engine = Engine(EngineConfig(model=str(ZOO / "base"), adapters=(AdapterSpec("reverse", str(ZOO / "adapters" / "reverse")),),
                                 max_adapter_slots=1, max_lora_rank=16, num_kv_blocks=64))
    engine.grammars.timeout_s = 2.0
    hostile = SamplingParams(max_new_tokens=8, grammar=GrammarSpec("regex", HOSTILE_REGEX))
    plain = SamplingParams(max_new_tokens=ZOO_MAX_NEW)
    try:
        complete_all(engine, [(prompt("warm"), None, SamplingParams(max_new_tokens=4, grammar=ANSWER))])  # worker up

        async def scenario() -> tuple[Any, BaseException, bool]:
            bad = asyncio.ensure_future(engine.complete(prompt("x"), hostile))
            good = await engine.complete(prompt("hello lora"), plain, adapter_id="reverse")
            pending_when_good_finished = not bad.done()
            try:
                await bad
            except InvalidRequestError as exc:
                return good, exc, pending_when_good_finished
            raise AssertionError("the hostile grammar compiled")

        good, error, overlapped = asyncio.run(scenario())
        assert good.generated_text == "arol olleh" and overlapped  # decoded while the grammar compiled
        assert "did not compile within 2 s" in str(error)
        started = time.monotonic()
        with pytest.raises(InvalidRequestError, match="did not compile"):  # remembered: refused at once
            complete_all(engine, [(prompt("x"), None, hostile)])
        assert time.monotonic() - started < 1.0
        # The killed worker is replaced: the next new grammar compiles.
        out = complete_all(engine, [(prompt("lora"), "reverse", SamplingParams(max_new_tokens=ZOO_MAX_NEW,
                                                                               grammar=BAR_GRAMMARS["tags"]))])[0]
        check_output("tags", out.generated_text)
    finally:
        engine.shutdown()


def test_masks_of_a_batch_are_filled_together(zoo_engine: Engine) -> None:
    """MaskFiller: rows without a grammar get no mask row; JSON rows get the vocabulary filter."""
    json_grammar = zoo_engine.grammars.matcher(ANSWER)
    regex_grammar = zoo_engine.grammars.matcher(GrammarSpec("regex", "\t[a-z]+"))
    mask = MaskFiller().mask([None, json_grammar, None, regex_grammar], 259)
    assert mask is not None and mask.rows.tolist() == [1, 3] and not mask.all_rows
    allowed_json = [t for t in range(259) if bit_allowed(mask.bitmask, 0, t)]
    assert [bytes([t]) for t in allowed_json] == [b"{"]
    assert bit_allowed(mask.bitmask, 1, 9)  # a regex may ask for a tab; only JSON rows are filtered
    assert MaskFiller().mask([None, None], 259) is None


# ---- HTTP (in-process app) -------------------------------------------------------------------------
class Http:
    def __init__(self, core: ReplicaCore) -> None:
        self.app = create_app(LocalBackend(core))

    def post(self, url: str, body: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                return await client.post(url, json=body)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def http(zoo_core: ReplicaCore) -> Http:
    return Http(zoo_core)


def test_tgi_generate_with_json_grammar(http: Http) -> None:
    schema = BAR_SCHEMAS["sentiment"]
    for value in (schema, json.dumps(schema)):  # TGI takes the schema as an object or as a string
        r = http.post("/generate", {"inputs": prompt("hello"), "parameters": {
            "adapter_id": "uppercase", "max_new_tokens": ZOO_MAX_NEW, "details": True,
            "grammar": {"type": "json", "value": value}}})
        assert r.status_code == 200, r.text
        body = r.json()
        jsonschema.validate(json.loads(body["generated_text"]), schema)
        assert body["details"]["finish_reason"] == "eos_token"
    r = http.post("/generate", {"inputs": prompt("hello"), "parameters": {
        "max_new_tokens": ZOO_MAX_NEW, "grammar": {"type": "json_schema", "value": {"name": "s", "schema": schema}}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)


def test_tgi_generate_stream_with_regex_grammar(http: Http) -> None:
    r = http.post("/generate_stream", {"inputs": prompt("stream me"), "parameters": {
        "adapter_id": "rot13", "max_new_tokens": 32, "details": True,
        "grammar": {"type": "regex", "value": BAR_REGEX}}})
    assert r.status_code == 200, r.text
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    final = events[-1]
    assert re.fullmatch(BAR_REGEX, final["generated_text"]) and final["details"]["finish_reason"] == "eos_token"
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == final["generated_text"]


def test_openai_completions_response_format(http: Http) -> None:
    schema = BAR_SCHEMAS["person"]
    r = http.post("/v1/completions", {"model": "lowercase", "prompt": prompt("Ada"), "max_tokens": ZOO_MAX_NEW,
                                      "temperature": 0, "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    jsonschema.validate(json.loads(choice["text"]), schema)
    assert choice["finish_reason"] == "stop"
    r = http.post("/v1/completions", {"prompt": prompt("x"), "max_tokens": ZOO_MAX_NEW, "temperature": 0,
                                      "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # any object may run past the budget; it is still a prefix of one
        assert text.startswith("{")
    plain = {"prompt": prompt("hello lora"), "max_tokens": 20, "temperature": 0, "model": "reverse"}
    with_text = http.post("/v1/completions", {**plain, "response_format": {"type": "text"}}).json()
    assert with_text["choices"][0]["text"] == http.post("/v1/completions", plain).json()["choices"][0]["text"]


TGI_GRAMMAR_ERRORS: list[tuple[Any, str]] = [
    ({"type": "yaml", "value": "a"}, "grammar.type: must be one of ['json', 'regex', 'json_schema']"),
    ({"type": "json"}, "grammar.value: is required"),
    ({"type": "json", "value": "{not json"}, "grammar.value: a string value must hold a JSON schema"),
    ({"type": "json", "value": [1]}, "grammar.value: must be a JSON schema"),
    ({"type": "regex", "value": {"a": 1}}, "grammar.value: a regex must be a string"),
    ({"type": "json_schema", "value": {"name": "x"}}, "grammar.value.schema: is required"),
    ("json", "grammar: must be a JSON object"),
    ({"type": "json", "value": {"type": "strin"}}, 'grammar: invalid JSON schema: Unsupported type "strin"'),
    ({"type": "regex", "value": "(["}, "grammar: invalid regex"),
]


@pytest.mark.parametrize(("grammar", "needle"), TGI_GRAMMAR_ERRORS)
def test_tgi_grammar_errors(http: Http, grammar: Any, needle: str) -> None:
    for route in ("/generate", "/generate_stream"):
        r = http.post(route, {"inputs": prompt("x"), "parameters": {"grammar": grammar}})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error_type"] == "validation" and needle in body["error"], body
        assert ".cc" not in body["error"]


OPENAI_FORMAT_ERRORS: list[tuple[Any, str]] = [
    ({"type": "xml"}, "response_format.type: must be one of"),
    ({"type": "json_schema"}, "response_format.json_schema: is required"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema: is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}, "unknown"),
    ({"type": "json_object", "schema": {}}, "unknown"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     'response_format: invalid JSON schema: Unsupported type "strin"'),
]


@pytest.mark.parametrize(("fmt", "needle"), OPENAI_FORMAT_ERRORS)
def test_openai_response_format_errors(http: Http, fmt: Any, needle: str) -> None:
    r = http.post("/v1/completions", {"prompt": prompt("x"), "max_tokens": 4, "response_format": fmt})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    if "unknown" not in needle:
        assert error["param"] == "response_format"


# ---- real clients against a real local server (slow) ------------------------------------------------
@contextlib.contextmanager
def local_server(core: ReplicaCore) -> Iterator[str]:
    """The same Starlette app, served by uvicorn on 127.0.0.1 in a thread (no Ray): a real HTTP server."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(LocalBackend(core)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def smollm2_core() -> Iterator[ReplicaCore]:
    from models.resolve import resolve_model

    try:
        resolved = resolve_model("smollm2")
    except Exception as exc:  # the GGUF comes from an optional package
        pytest.skip(f"SmolLM2 not available: {exc}")
    config = EngineConfig(model=resolved.path, adapters=resolved.adapters, max_lora_rank=16, max_adapter_slots=8,
                          num_kv_blocks=1024, max_num_seqs=64, max_num_batched_tokens=1024, max_queue_wait_s=None)
    core = ReplicaCore(config, "smollm2")
    yield core
    core.shutdown()


@pytest.mark.slow
def test_inference_client_and_openai_client_unmodified(zoo_core: ReplicaCore, smollm2_core: ReplicaCore) -> None:
    from huggingface_hub import InferenceClient
    from openai import OpenAI

    with local_server(zoo_core) as url:
        client = InferenceClient(url)
        schema = BAR_SCHEMAS["answer"]
        text = client.text_generation(prompt("hello lora"), adapter_id="reverse", max_new_tokens=ZOO_MAX_NEW,
                                      grammar={"type": "json", "value": schema})
        jsonschema.validate(json.loads(text), schema)
        events = list(client.text_generation(prompt("hello lora"), adapter_id="reverse", stream=True, details=True,
                                             max_new_tokens=ZOO_MAX_NEW, grammar={"type": "regex", "value": BAR_REGEX}))
        assert re.fullmatch(BAR_REGEX, events[-1].generated_text)
        assert events[-1].details.finish_reason == "eos_token"
        assert "".join(e.token.text for e in events if not e.token.special) == events[-1].generated_text
        oa = OpenAI(base_url=f"{url}/v1", api_key="-")
        completion = oa.completions.create(model="reverse", prompt=prompt("hello lora"), max_tokens=ZOO_MAX_NEW,
                                           temperature=0, extra_body={"response_format": {"type": "json_schema",
                                           "json_schema": {"name": "answer", "schema": schema}}})
        jsonschema.validate(json.loads(completion.choices[0].text), schema)
    with local_server(smollm2_core) as url:  # the README example: json-answer with a schema, on the chat route
        oa = OpenAI(base_url=f"{url}/v1", api_key="-")
        city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                 "country": {"type": "string", "maxLength": 40}},
                "required": ["city", "country"]}
        chat = oa.chat.completions.create(
            model="json-answer", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city}})
        answer = json.loads(chat.choices[0].message.content or "")
        jsonschema.validate(answer, city)
        assert chat.choices[0].finish_reason == "stop"
        hf = InferenceClient(url).chat_completion(
            model="json-answer", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=60, response_format={"type": "json", "value": city})
        jsonschema.validate(json.loads(hf.choices[0].message.content), city)


# ---- the bar: 200 requests over the zoo and the SmolLM2 showcase adapters (slow) --------------------
def _bar_run(engine: Engine, jobs: list[tuple[str, str | None]], max_new: int) -> tuple[list[Any], list[Any]]:
    """Each job with a grammar (rotating over the six) and without, all in one run; and without, alone."""
    names = list(BAR_GRAMMARS)
    plain = SamplingParams(max_new_tokens=max_new)
    alone = complete_all(engine, [(p, a, plain) for p, a in jobs])
    mixed = complete_all(engine, [(p, a, SamplingParams(max_new_tokens=max_new, grammar=BAR_GRAMMARS[names[i % 6]]))
                                  for i, (p, a) in enumerate(jobs)] + [(p, a, plain) for p, a in jobs])
    for i, out in enumerate(mixed[: len(jobs)]):
        check_output(names[i % 6], out.generated_text)  # parses and validates, every one
    assert [o.token_ids for o in mixed[len(jobs):]] == [o.token_ids for o in alone]  # fidelity
    return mixed[: len(jobs)], alone


@pytest.mark.slow
def test_bar_200_requests_zoo_and_smollm2(zoo_engine: Engine, smollm2_core: ReplicaCore) -> None:
    zoo = zoo_jobs(4, seed=11)[:120]  # 30 adapters x 4
    constrained, _ = _bar_run(zoo_engine, zoo, ZOO_MAX_NEW)
    assert len(constrained) == 120 and len({a for _, a in zoo}) == 30
    sys.path.insert(0, str(REPO / "models" / "smollm2"))
    from common import chat_text
    from prompts import heldout_prompts

    engine = smollm2_core.engine
    questions = heldout_prompts()[:16]
    adapters: list[str | None] = [None, "all-caps", "answer-prefix", "bullets", "json-answer"]
    smol = [(chat_text(engine.tokenizer, q), a) for a in adapters for q in questions]  # 80
    constrained, _ = _bar_run(engine, smol, 96)
    assert len(constrained) == 80
