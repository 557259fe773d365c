"""Structured output benchmarks (issue 16).

    python -m loadtests.bench_grammar --libraries   # xgrammar vs llguidance vs outlines-core: mask cost, compile time
    python -m loadtests.bench_grammar               # engine throughput, grammars on vs off, one run (SmolLM2)
    python -m loadtests.bench_grammar --quick       # a small smoke run of the throughput comparison

`--libraries` is how the library was chosen. Each candidate runs in its own subprocess (fresh caches,
a wall-clock limit) with SmolLM2-135M's tokenizer (49,152 tokens) and measures:

- tokenizer info: building the library's view of the vocabulary (once per server);
- cold compile: one moderately complex JSON schema (nested objects, arrays of objects, enum, integer
  bounds, a string pattern, a format, optional fields), compiled by a fresh compiler, no cache;
- mask fill at batch 64: 64 matchers of that schema, each at a different point of a valid document,
  fill one [64, vocab] bitmask per step with the library's batched API (outlines-core has none: a
  loop over its guides), then each matcher accepts its next token;
- apply: the [64, vocab] bitmask applied to float32 logits with one tensor op.

The throughput mode serves SmolLM2 (adapters json-answer, bullets, all-caps, answer-prefix and the
base) with the same requests twice in one process: once without grammar, once with a JSON schema
per request (5 schemas, greedy, fixed max_new_tokens), and reports generated tokens/s and the ratio.
Results go to --out (markdown + JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.sampling_params import GrammarSpec

LIBRARIES = ("xgrammar", "llguidance", "outlines-core")
BATCH = 64
STEPS = 200
LIBRARY_TIMEOUT_S = 600

# A moderately complex schema: what an extraction or tool-call endpoint sends.
ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 0},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "tier"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity"],
            },
            "minItems": 1,
            "maxItems": 8,
        },
        "gift": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 80},
    },
    "required": ["order_id", "customer", "items"],
}
ORDER_DOCUMENT = json.dumps({
    "order_id": 1042,
    "customer": {"name": "Ada Lovelace", "email": "ada@example.org", "tier": "pro"},
    "items": [{"sku": "ABC-1234", "quantity": 2, "price": 19.5}, {"sku": "XYZ-0001", "quantity": 1}],
    "gift": False,
    "note": "Leave at the door, please.",
})  # json.dumps' separators (", ", ": "): what the compact grammars of the three libraries produce


# The structured-output workload of the throughput mode and of the 200-request bar in
# tests/test_structured_output.py: five JSON schemas and a regex, each output at most ~60 characters
# (strings and arrays bounded, integers ranged), so that every request can finish within its budget
# even at one byte per token (the zoo's tokenizer).
BAR_SCHEMAS: dict[str, dict[str, Any]] = {
    "answer": {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 24}}, "required": ["answer"]},
    "sentiment": {
        "type": "object",
        "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                       "score": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["label", "score"],
    },
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120}, "member": {"type": "boolean"}},
        "required": ["name", "age", "member"],
    },
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    "reading": {
        "type": "object",
        "properties": {"unit": {"enum": ["C", "F", "K"]}, "value": {"type": "integer", "minimum": -50, "maximum": 150},
                       "note": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]}},
        "required": ["unit", "value", "note"],
    },
}
BAR_REGEX = r"[A-Z][a-z]{2,8}-[0-9]{3}"
BAR_GRAMMARS: dict[str, GrammarSpec] = {
    **{name: GrammarSpec("json", json.dumps(schema)) for name, schema in BAR_SCHEMAS.items()},
    "code": GrammarSpec("regex", BAR_REGEX),
}


def check_output(grammar_name: str, text: str) -> None:
    """Raise unless `text` is a complete output of BAR_GRAMMARS[grammar_name] (JSON Schema validated)."""
    import jsonschema

    if grammar_name == "code":
        if re.fullmatch(BAR_REGEX, text) is None:
            raise AssertionError(f"{text!r} does not match {BAR_REGEX}")
        return
    jsonschema.validate(json.loads(text), BAR_SCHEMAS[grammar_name])


def smollm2_tokenizer_dir() -> Path:
    from models.resolve import resolve_model

    return Path(resolve_model("smollm2").path)


# ---- one library, in its own process -------------------------------------------------------------
def _byte_level_vocab(tokenizer: Any) -> dict[bytes, list[int]]:
    """Token bytes of a GPT-2 style byte-level BPE vocabulary (SmolLM2's), special tokens left out."""
    # GPT-2's byte-to-character table: printable bytes stand for themselves, the others for 256, 257, ...
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_codes = list(byte_values)
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            char_codes.append(256 + len(char_codes) - 188)
    decode = {chr(c): b for b, c in zip(byte_values, char_codes)}
    special = set(tokenizer.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        out.setdefault(bytes(decode[ch] for ch in text), []).append(token_id)
    return out


class _Candidate:
    """The three operations measured, over one library's API."""

    def __init__(self, name: str, tokenizer: Any, vocab_size: int, eos: int, threads: int) -> None:
        self.name, self.tokenizer, self.vocab_size, self.eos, self.threads = name, tokenizer, vocab_size, eos, threads

    def build_tokenizer_info(self) -> None:
        if self.name == "xgrammar":
            import xgrammar as xgr

            self.info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=[self.eos])
            self.batch = xgr.BatchGrammarMatcher(max_threads=self.threads)
        elif self.name == "llguidance":
            import llguidance
            import llguidance.hf

            self.info = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos)
            self.executor = llguidance.LLExecutor(num_threads=self.threads)
        else:
            from outlines_core import Vocabulary

            self.info = Vocabulary(self.eos, _byte_level_vocab(self.tokenizer))

    def compile(self, schema: str) -> Any:
        if self.name == "xgrammar":
            import xgrammar as xgr

            compiler = xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
            return compiler.compile_json_schema(schema, any_whitespace=False)
        if self.name == "llguidance":
            import llguidance

            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.info)
            if is_error:
                raise ValueError(messages[0])
            return grammar
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(schema), self.info)

    def matcher(self, compiled: Any) -> Any:
        if self.name == "xgrammar":
            import xgrammar as xgr

            return xgr.GrammarMatcher(compiled)
        if self.name == "llguidance":
            import llguidance

            return llguidance.LLMatcher(self.info, compiled, log_level=0)
        from outlines_core import Guide

        return Guide(compiled)

    def accept(self, matcher: Any, token_id: int) -> bool:
        if self.name == "xgrammar":
            return bool(matcher.accept_token(token_id))
        if self.name == "llguidance":
            return bool(matcher.consume_token(token_id))
        matcher.advance(token_id)
        return True

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        if self.name == "xgrammar":
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        elif self.name == "llguidance":
            import llguidance.torch

            llguidance.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)],
                                                         bitmask)
        else:
            row_bytes = bitmask.shape[1] * 4
            for i, guide in enumerate(matchers):
                guide.write_mask_into(bitmask.data_ptr() + i * row_bytes, bitmask.shape[1], 4)


def _measure_library(name: str, threads: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from engine.grammar_mask import GrammarMask

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    vocab_size = len(tokenizer)
    cand = _Candidate(name, tokenizer, vocab_size, int(tokenizer.eos_token_id), threads)
    t0 = time.perf_counter()
    cand.build_tokenizer_info()
    info_s = time.perf_counter() - t0
    schema = json.dumps(ORDER_SCHEMA)
    t0 = time.perf_counter()
    compiled = cand.compile(schema)
    compile_s = time.perf_counter() - t0
    # Some work is lazy (llguidance builds its lexer with the matcher): the time to the first mask is the
    # cold cost a request sees.
    first = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    cand.fill([cand.matcher(compiled)], first)
    first_mask_s = time.perf_counter() - t0

    doc = tokenizer.encode(ORDER_DOCUMENT, add_special_tokens=False)
    matchers, positions = [], []
    for i in range(BATCH):  # each matcher at its own point of the document
        m = cand.matcher(compiled)
        start = (i * 7) % (len(doc) - 1)
        for t in doc[:start]:
            assert cand.accept(m, t), f"{name} refused a token of a valid document"
        matchers.append(m)
        positions.append(start)
    bitmask = torch.zeros(BATCH, (vocab_size + 31) // 32, dtype=torch.int32)
    logits = torch.randn(BATCH, vocab_size)
    mask = GrammarMask(torch.arange(BATCH), bitmask, all_rows=True)  # the engine's apply, the same for all
    fill_ms: list[float] = []
    accept_us: list[float] = []
    apply_ms: list[float] = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        cand.fill(matchers, bitmask)
        fill_ms.append((time.perf_counter() - t0) * 1e3)
        work = logits.clone()
        t0 = time.perf_counter()
        mask.apply(work)
        apply_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            token = doc[positions[i]]
            allowed = (int(bitmask[i, token // 32]) >> (token % 32)) & 1
            assert allowed, f"{name}: the document's next token is masked out"
            assert cand.accept(m, token)
            positions[i] += 1
            if positions[i] == len(doc):  # the end of the document: start over
                matchers[i] = cand.matcher(compiled)
                positions[i] = 0
        accept_us.append((time.perf_counter() - t0) * 1e6 / BATCH)
    fill_ms.sort()
    return {
        "library": name,
        "version": _version(name),
        "tokenizer_info_s": round(info_s, 3),
        "cold_compile_s": round(compile_s, 4),
        "first_mask_s": round(first_mask_s, 4),
        "fill_ms_median": round(statistics.median(fill_ms), 3),
        "fill_ms_p95": round(fill_ms[int(0.95 * len(fill_ms))], 3),
        "apply_ms_median": round(statistics.median(apply_ms), 3),
        "accept_us_median": round(statistics.median(accept_us), 2),
        "threads": threads,
    }


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def compare_libraries(out: Path, threads: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in LIBRARIES:
        cmd = [sys.executable, "-m", "loadtests.bench_grammar", "--library-worker", name, "--threads", str(threads)]
        print(f"measuring {name} ...", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LIBRARY_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            rows.append({"library": name, "error": f"did not finish within {LIBRARY_TIMEOUT_S} s"})
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append({"library": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        rows.append(json.loads(lines[-1]))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"batch": BATCH, "steps": STEPS, "vocab": "SmolLM2-135M (49152)", "threads": threads,
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "libraries.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = [
        "| library | version | tokenizer info s | cold compile s | compile + first mask s "
        "| mask fill ms/step (batch 64) median / p95 | apply ms/step | accept µs/token |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['library']} | | | | | {r['error']} | | |")
            continue
        table.append(
            f"| {r['library']} | {r['version']} | {r['tokenizer_info_s']:.2f} | {r['cold_compile_s']:.3f} "
            f"| {r['first_mask_s']:.3f} "
            f"| {r['fill_ms_median']:.2f} / {r['fill_ms_p95']:.2f} | {r['apply_ms_median']:.2f} "
            f"| {r['accept_us_median']:.1f} |"
        )
    text = "\n".join(table) + (
        f"\n\nSchema: ORDER_SCHEMA in loadtests/bench_grammar.py; {BATCH} matchers at different points of a valid "
        f"document, {STEPS} steps; {threads} thread(s); load average at the end {meta['load_average'][0]:.2f}; "
        f"{meta['date']}.\n"
    )
    (out / "libraries.md").write_text(text)
    print(text)
    return rows


# ---- engine throughput, grammars on vs off ----------------------------------------------------------
def _engine_and_jobs(quick: bool, n: int) -> tuple[Any, list[tuple[str, str | None]], int]:
    from engine import Engine, EngineConfig
    from models.resolve import resolve_model

    if quick:  # the zoo: tiny, byte-level; prompts are "<input>="
        resolved = resolve_model("zoo")
        adapters = resolved.adapters[:8]
        engine = Engine(EngineConfig(model=resolved.path, adapters=adapters, max_lora_rank=16, max_adapter_slots=8,
                                     num_kv_blocks=1024, max_num_seqs=64, max_queue_wait_s=None))
        words = ["lora", "serve", "grammar", "batch", "token", "adapter", "schema", "regex"]
        names: list[str | None] = [None, *(a.adapter_id for a in adapters)]
        return engine, [(f"{words[i % len(words)]} {i}=", names[i % len(names)]) for i in range(n)], 64
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "smollm2"))
    from common import chat_text
    from prompts import heldout_prompts

    resolved = resolve_model("smollm2")
    engine = Engine(EngineConfig(model=resolved.path, adapters=resolved.adapters, max_lora_rank=16,
                                 max_adapter_slots=8, num_kv_blocks=1024, max_num_seqs=64,
                                 max_num_batched_tokens=1024, max_queue_wait_s=None))
    questions = heldout_prompts()
    names = [None, *(spec.adapter_id for spec in resolved.adapters)]
    jobs = [(chat_text(engine.tokenizer, questions[i % len(questions)]), names[i % len(names)]) for i in range(n)]
    return engine, jobs, 96


def _timed(engine: Any, jobs: list[tuple[str, str | None, Any]]) -> tuple[float, list[Any]]:
    import asyncio

    async def go() -> list[Any]:
        return list(await asyncio.gather(*(engine.complete(p, params, adapter_id=a) for p, a, params in jobs)))

    started = time.perf_counter()
    outs = asyncio.run(go())
    return time.perf_counter() - started, outs


class _MaskTimer:
    """Wall time spent filling and applying grammar masks (wraps engine/grammar_mask.py's two calls)."""

    def __init__(self) -> None:
        from engine import grammar_mask as grammar

        self.seconds = 0.0
        self.calls = 0
        self._saved = (grammar.MaskFiller.mask, grammar.GrammarMask.apply)
        timer = self

        def mask(filler: Any, *args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return timer._saved[0](filler, *args)
            finally:
                timer.seconds += time.perf_counter() - t0
                timer.calls += 1

        def apply(mask_: Any, logits: Any) -> None:
            t0 = time.perf_counter()
            try:
                timer._saved[1](mask_, logits)
            finally:
                timer.seconds += time.perf_counter() - t0

        grammar.MaskFiller.mask, grammar.GrammarMask.apply = mask, apply  # type: ignore[method-assign]

    def close(self) -> None:
        from engine import grammar_mask as grammar

        grammar.MaskFiller.mask, grammar.GrammarMask.apply = self._saved  # type: ignore[method-assign]


def throughput(out: Path, quick: bool, requests: int, repeats: int, threads: int) -> dict[str, Any]:
    """Tokens/s of the same requests with a grammar each (rotating over BAR_GRAMMARS) and without.

    Grammar outputs end when their grammar does, so "off, same lengths" runs every request for exactly
    the tokens its grammar run produced (EOS ignored): the same work, with and without masks; that
    ratio is the cost of structured output. "off, free" (EOS ends the request) is shown for reference.
    The cases alternate within each repeat and the best run of each counts (other work on a shared
    machine only slows runs down); the time inside the mask calls is measured too, as a share of the
    grammar run: on a busy machine that share is the steadier figure.
    """
    from engine import SamplingParams

    torch.set_num_threads(threads)
    engine, jobs, max_new = _engine_and_jobs(quick, requests)
    names = list(BAR_GRAMMARS)
    try:
        t0 = time.perf_counter()
        for name in names:  # cold compiles (the first also starts the compile worker), then cached
            engine.grammars.compile(BAR_GRAMMARS[name])
        compile_s = time.perf_counter() - t0
        on = [(p, a, SamplingParams(max_new_tokens=max_new, grammar=BAR_GRAMMARS[names[i % len(names)]]))
              for i, (p, a) in enumerate(jobs)]
        best: dict[str, tuple[float, int]] = {}
        valid = 0
        mask_share: list[tuple[float, float]] = []  # (share of the run, ms per step) per repeat
        # Greedy: a request's grammar output, and so its length, is the same in every run.
        _, first = _timed(engine, on)
        lengths = [o.generated_tokens for o in first]
        for i, o in enumerate(first):
            with contextlib.suppress(Exception):
                check_output(names[i % len(names)], o.generated_text)
                valid += 1
        runs = {
            "grammar on": on,
            "grammar off, same lengths": [(p, a, SamplingParams(max_new_tokens=n, ignore_eos=True))
                                          for (p, a), n in zip(jobs, lengths)],
            "grammar off, free": [(p, a, SamplingParams(max_new_tokens=max_new)) for p, a in jobs],
        }
        order = list(runs)
        for r in range(repeats):
            for case in order[r % 3:] + order[: r % 3]:  # each case runs first once in three repeats
                timer = _MaskTimer() if case == "grammar on" else None
                try:
                    steps = engine.stats().steps
                    seconds, outs = _timed(engine, runs[case])
                    steps = engine.stats().steps - steps
                finally:
                    if timer is not None:
                        timer.close()
                if timer is not None:
                    mask_share.append((timer.seconds / seconds, timer.seconds * 1e3 / max(1, steps)))
                tokens = sum(o.generated_tokens for o in outs)
                if case not in best or tokens / seconds > best[case][1] / best[case][0]:
                    best[case] = (seconds, tokens)
    finally:
        engine.shutdown()
    rate = {case: tokens / secs for case, (secs, tokens) in best.items()}
    ratio = rate["grammar on"] / rate["grammar off, same lengths"]
    model = "zoo (byte-level, 259 tokens)" if quick else "SmolLM2-135M-Instruct (49,152 tokens)"
    lines = [
        "| case | requests | generated tokens | wall s (best run) | tokens/s | vs grammar off, same lengths |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, (secs, tokens) in best.items():
        lines.append(f"| {case} | {len(jobs)} | {tokens} | {secs:.2f} | {rate[case]:.1f} "
                     f"| {rate[case] / rate['grammar off, same lengths']:.3f}x |")
    share, mask_ms_per_step = min(mask_share)
    meta = {"model": model, "requests": len(jobs), "max_new_tokens": max_new, "repeats": repeats, "threads": threads,
            "grammars": names, "cold_compile_all_s": round(compile_s, 2), "valid_outputs": valid,
            "mask_share_of_grammar_run": round(share, 4), "mask_ms_per_step": round(mask_ms_per_step, 2),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = "\n".join(lines) + (
        f"\n\n{model}, float32, {threads} threads; {len(jobs)} requests at once over the base model and its adapters, "
        f"greedy, each with one of {len(names)} grammars ({', '.join(names)}); {valid}/{len(jobs)} grammar outputs "
        f"validate. Grammar on / off at the same lengths: **{ratio:.3f}x**; filling and applying the masks took "
        f"{share:.1%} of the grammar run ({mask_ms_per_step:.1f} ms per step). Compiling the {len(names)} grammars "
        f"cold (worker start included): {compile_s:.2f} s. Best of {repeats}, load average "
        f"{meta['load_average'][0]:.2f}, {meta['date']}.\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_quick" if quick else "throughput"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "ratio": ratio, "cases": best}, indent=2))
    print(text)
    return {"ratio": ratio, "rates": rate, "mask_share": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--libraries", action="store_true", help="compare the candidate grammar libraries")
    parser.add_argument("--library-worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the zoo model and 32 requests: a smoke run")
    parser.add_argument("--requests", type=int, default=0, help="requests per run (default 64, quick 32)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case; the best counts")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/grammar"))
    args = parser.parse_args()
    if args.library_worker:
        print(json.dumps(_measure_library(args.library_worker, args.threads)))
        return
    if args.libraries:
        compare_libraries(args.out, args.threads)
        return
    throughput(args.out, args.quick, args.requests or (32 if args.quick else 64), args.repeats, args.threads)


if __name__ == "__main__":
    main()
