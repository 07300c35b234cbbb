"""The app class: Flask, asking once whether each hook is a coroutine function."""

from __future__ import annotations

import flask.app

from llm_service import Gateway


def test_each_hook_is_inspected_once_not_per_request(app, monkeypatch):
    asked = []
    inspect_ = flask.app.iscoroutinefunction

    def counting(func):
        asked.append(func)
        return inspect_(func)

    monkeypatch.setattr(flask.app, "iscoroutinefunction", counting)
    client = app.test_client()
    client.get("/health/live")
    first = len(asked)
    for _ in range(3):
        assert client.get("/health/live").status_code == 200
    assert first > 5  # every hook and the view, once
    assert len(asked) == first


def test_the_callables_kept_are_bounded(monkeypatch):
    monkeypatch.setattr(Gateway, "SYNC_KEPT", 4)
    app = Gateway("bounded")
    for n in range(10):
        assert app.ensure_sync(lambda n=n: n)() == n
    assert len(app._sync_kept) == 4
    # Unhashable callables are answered too, as Flask would.
    assert app.ensure_sync(Unhashable())() == "called"


class Unhashable:
    __hash__ = None

    def __call__(self) -> str:
        return "called"
