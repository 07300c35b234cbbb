"""Unit-test fixtures: retries never really sleep."""

import pytest

from llm_service.lmstudio import LMStudioClient


@pytest.fixture(autouse=True)
def sleeps(monkeypatch):
    """Record the waits of the retry layer instead of sleeping through them.

    The client's own ``sleep`` is replaced (for every client, those the apps
    build included), so threads elsewhere (the fake LM Studio) keep their clock.
    """
    recorded: list[float] = []
    monkeypatch.setattr(LMStudioClient, "sleep", staticmethod(recorded.append))
    return recorded
