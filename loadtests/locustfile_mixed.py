"""Mixed prompt and output lengths: short/medium/long prompts and 4..128 new tokens, so that long
prefills share steps with short decodes (chunked prefill + continuous batching). Constant users.
"""

from __future__ import annotations

import random

from locust import task

from loadtests.scenarios.common import LoraUser
from loadtests.scenarios.shapes import ConstantShape

__all__ = ["ConstantShape", "MixedUser"]

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "hex", "bad", "jugglers"]
PROMPT_WORDS = ((4, 0.5), (32, 0.3), (96, 0.2))  # (words, probability)
NEW_TOKENS = ((4, 0.3), (32, 0.5), (128, 0.2))


def _weighted(choices: tuple[tuple[int, float], ...]) -> int:
    values, weights = zip(*choices, strict=True)
    return int(random.choices(values, weights=weights)[0])


class MixedUser(LoraUser):
    def pick_prompt(self) -> str:
        return " ".join(random.choice(WORDS) for _ in range(_weighted(PROMPT_WORDS)))

    def pick_max_new_tokens(self) -> int:
        return _weighted(NEW_TOKENS)

    @task
    def generate(self) -> None:
        self.one_request()
