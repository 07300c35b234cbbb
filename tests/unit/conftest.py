"""Unit-test fixtures: retries never really sleep."""

import types

import backoff._sync
import pytest


@pytest.fixture(autouse=True)
def sleeps(monkeypatch):
    """Record the waits of the retry layer instead of sleeping through them.

    Only backoff's own reference to ``time`` is replaced, so threads elsewhere
    (the fake LM Studio) keep their real clock.
    """
    recorded: list[float] = []
    monkeypatch.setattr(
        backoff._sync, "time", types.SimpleNamespace(sleep=recorded.append)
    )
    return recorded
