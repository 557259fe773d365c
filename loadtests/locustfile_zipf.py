"""Many adapters with Zipf popularity: adapter k (1-based, in the server's order) is drawn with
probability proportional to 1 / k**LOADTEST_ZIPF_S (default 1.1): a few hot adapters and a long
tail, the traffic that exercises the adapter swap pool and adapter-affinity routing. Constant users.
"""

from __future__ import annotations

import random

from locust import task

from loadtests.scenarios.common import LoraUser, env_float, server_adapters
from loadtests.scenarios.shapes import ConstantShape

__all__ = ["ConstantShape", "ZipfUser"]


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k ** s) for k in range(1, n + 1)]


class ZipfUser(LoraUser):
    def pick_adapter(self) -> str:
        adapters = server_adapters(self)
        return random.choices(adapters, weights=zipf_weights(len(adapters), env_float("LOADTEST_ZIPF_S", 1.1)))[0]

    @task
    def generate(self) -> None:
        self.one_request()
