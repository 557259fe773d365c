"""Burst traffic: idle (1 user) -> a step to many users -> idle, uniform over the server's adapters,
half the requests streamed (TTFT from the stream). `python -m loadtests.run_loadtest --scenario burst`
runs it headless and writes the report; by hand:

    LOADTEST_DURATION=60 LOADTEST_USERS=16 locust -f loadtests/locustfile_burst.py --headless \
        --host http://127.0.0.1:8000
"""

from __future__ import annotations

from locust import task

from loadtests.scenarios.common import LoraUser
from loadtests.scenarios.shapes import BurstShape

__all__ = ["BurstShape", "BurstUser"]


class BurstUser(LoraUser):
    @task
    def generate(self) -> None:
        self.one_request()
