"""Hardening of upstream calls: call scopes, masking, strict JSON, the 500 path."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from llm_service.errors import INTERNAL_MESSAGE
from llm_service.lmstudio import CallScope, LMStudioClient
from llm_service.lmstudio.errors import MESSAGE_LIMIT, redact, safe_excerpt
from tests.conftest import UPSTREAM

MODELS = f"{UPSTREAM}/v1/models"
CHAT = f"{UPSTREAM}/v1/chat/completions"
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- masking (item 9) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        ("key sk-proj-AbCdEf0123456789xyz was rejected", "AbCdEf0123456789xyz"),
        ("cannot reach http://admin:pa55word@db:5432/x", "pa55word"),
        ("api_key=hunter2&model=x", "hunter2"),
        ('{"password": "swordfish", "model": "x"}', "swordfish"),
        ("{'access_token': 'tok-123'}", "tok-123"),
        ("Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ],
)
def test_redact_masks_credentials(text, secret):
    masked = redact(text)
    assert secret not in masked
    assert "***" in masked


def test_redact_keeps_plain_messages():
    text = 'Model "qwen" not found; max_tokens: 4096 exceeds n_ctx: 2048'
    assert redact(text) == text


def test_safe_excerpt_caps_long_messages():
    excerpt = safe_excerpt("x" * 100_000)
    assert len(excerpt) == MESSAGE_LIMIT
    assert excerpt.endswith("\u2026")
    assert safe_excerpt("short") == "short"


def test_relayed_upstream_message_is_capped_and_masked(client, upstream):
    echo = "you sent Authorization: Bearer tok-SECRET-1 and " + "prompt " * 500
    upstream.post(CHAT, status=400, json={"error": {"message": echo}})
    response = client.post("/llm/message", json=HELLO)
    assert response.status_code == 400
    message = response.json["error"]["message"]
    assert "tok-SECRET-1" not in message
    assert len(message) <= MESSAGE_LIMIT


def test_retry_log_lines_carry_no_upstream_text(client, upstream, log_output):
    echo = {"error": {"message": "echo: my private prompt"}}
    for _ in range(3):
        upstream.post(CHAT, status=500, json=echo)
    client.post("/llm/message", json=HELLO)
    everything = "\n".join(log_output.lines)
    assert "retrying" in everything
    assert "private prompt" not in everything


# -- strict JSON (item 15) -----------------------------------------------------


MESSAGES = '"messages": [{"role": "user", "content": "q"}]'


@pytest.mark.parametrize("path", ["/llm/message", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "fields",
    [
        '"temperature": NaN',
        '"x": Infinity',
        '"x": [-Infinity]',
        '"top_p": 1e400',
        '"logit_bias": {"1": -1e999}',
    ],
)
def test_non_standard_json_is_400_before_any_upstream_call(
    client, upstream, path, fields
):
    raw = f'{{"model": "m", {fields}, {MESSAGES}}}'
    # The strict mock has nothing registered: any upstream call would fail.
    response = client.post(path, data=raw, content_type="application/json")
    assert response.status_code == 400
    body = response.json
    code = body["error"]["code"]
    assert code == "invalid_json"
    assert len(upstream.calls) == 0


def test_embeddings_refuse_nan_too(client, upstream):
    response = client.post(
        "/v1/embeddings",
        data='{"input": "x", "dimensions": NaN}',
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_json"


def test_standard_json_numbers_still_pass(client, upstream):
    upstream.post(CHAT, json={"object": "chat.completion", "choices": []})
    raw = f'{{"model": "m", "temperature": 1.5e-3, "x": 1e300, {MESSAGES}}}'
    response = client.post(
        "/v1/chat/completions", data=raw, content_type="application/json"
    )
    assert response.status_code == 200
    assert json.loads(upstream.calls[0].request.body)["x"] == 1e300


def test_wrong_content_type_is_still_415(client):
    response = client.post("/llm/message", data="{}", content_type="text/plain")
    assert response.status_code == 415


# -- the 500 path (item 7) and non-object answers ------------------------------


def test_non_object_answer_is_502_not_500(app_factory, upstream):
    client = app_factory(TESTING=False).test_client()
    upstream.post(CHAT, body="5", content_type="application/json")
    response = client.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 502
    assert response.json["error"]["code"] == "upstream_invalid_response"


def test_error_outside_a_view_is_logged_once_with_its_traceback(
    app_factory, log_output
):
    app = app_factory(TESTING=False)

    @app.get("/broken")
    def broken():
        return 5  # make_response refuses it: raised outside the view

    response = app.test_client().get("/broken", headers={"X-Correlation-ID": "c-7"})
    assert response.status_code == 500
    assert response.json["error"] == {
        "code": "internal_error",
        "message": INTERNAL_MESSAGE,
    }
    errors = [r for r in log_output.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].correlation_id == "c-7"
    assert errors[0].exc_info[0] is TypeError


def test_error_inside_a_view_is_logged_once(app_factory, log_output):
    app = app_factory(TESTING=False)

    @app.get("/explode")
    def explode():
        raise RuntimeError("boom")

    response = app.test_client().get("/explode")
    assert response.status_code == 500
    assert response.json["error"]["message"] == INTERNAL_MESSAGE
    errors = [r for r in log_output.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].exc_info[0] is RuntimeError


# -- access record: only the request's own call counts (items 16, 10.6) ---------


def _access(log_output):
    lines = [line for line in log_output.lines if '"llm_service.access"' in line]
    return json.loads(lines[-1])


def test_health_probes_are_not_counted_as_retries(client, upstream, log_output):
    upstream.get(MODELS, json={"data": [{"id": "qwen"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", json={"lmstudio": True})
    upstream.get(
        f"{UPSTREAM}/api/v0/models",
        json={"data": [{"id": "qwen", "type": "llm", "state": "loaded"}]},
    )
    assert client.get("/health").status_code == 200
    record = _access(log_output)
    assert record["upstream_retries"] == 0
    assert record["upstream_status"] is None


def test_model_lookup_probe_is_not_a_retry(client, upstream, log_output):
    upstream.get(MODELS, json={"data": [{"id": "qwen"}]})
    upstream.get(f"{UPSTREAM}/lmstudio-greeting", status=404)
    upstream.post(
        CHAT,
        json={"model": "qwen", "choices": [{"message": {"content": "ok"}}]},
    )
    body = {"messages": HELLO["messages"]}
    assert client.post("/llm/message", json=body).status_code == 200
    record = _access(log_output)
    assert record["upstream_retries"] == 0
    assert record["upstream_status"] == 200


# -- call scopes over a real socket (item 4, issue 10 item 4) ------------------


class _SilentServer:
    """Accepts connections, reads the request, never answers; records closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed_at: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            self.closed_at.append(time.monotonic())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def silent():
    server = _SilentServer()
    yield server
    server.close()


def test_cancel_wakes_a_blocked_call_and_closes_the_connection(silent):
    from llm_service.lmstudio import LMStudioCancelledError

    lm = LMStudioClient(silent.url, read_timeout=10, retry_budget=10, retries=0)
    scope = CallScope()
    threading.Timer(0.3, scope.cancel).start()
    started = time.monotonic()
    with pytest.raises(LMStudioCancelledError):
        lm.post_json("/v1/chat/completions", HELLO, scope=scope)
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 2
    while not silent.closed_at and time.monotonic() < deadline:
        time.sleep(0.01)
    assert silent.closed_at, "the upstream never saw the connection close"


def test_a_scope_is_the_threads_only_while_active_even_when_it_raises():
    from llm_service.lmstudio.watchdog import current_scope

    outer, inner = CallScope(), CallScope()
    seen = []

    def fail_inside() -> None:
        with inner.active():
            seen.append(current_scope())
            raise RuntimeError

    assert current_scope() is None
    with outer.active() as entered:
        assert entered is outer
        with pytest.raises(RuntimeError):
            fail_inside()
        assert seen == [inner]
        assert current_scope() is outer
    assert current_scope() is None
    thread = threading.Thread(target=lambda: seen.append(current_scope()))
    with outer.active():
        thread.start()
        thread.join()
    assert seen == [inner, None]


def test_budget_ends_a_call_whose_reads_never_time_out(silent):
    from llm_service.lmstudio import LMStudioTimeoutError

    # A read timeout of 10 s would never fire; the 0.5 s budget does.
    lm = LMStudioClient(silent.url, read_timeout=10, retry_budget=0.5, retries=0)
    started = time.monotonic()
    with pytest.raises(LMStudioTimeoutError, match="budget"):
        lm.get_json("/v1/models")
    assert time.monotonic() - started < 2


def test_a_read_cut_short_by_the_budget_says_so(silent, monkeypatch):
    """The socket's own timeout, cut to what is left of the budget, may fire
    before the scope's deadline: the caller hears the same "budget" either way."""
    from llm_service.lmstudio import LMStudioTimeoutError

    # Without a scope deadline only the read timeout (cut to 0.3 s) can fire.
    monkeypatch.setattr(CallScope, "set_deadline", lambda self, deadline: None)
    lm = LMStudioClient(silent.url, read_timeout=10, retry_budget=0.3, retries=0)
    with pytest.raises(LMStudioTimeoutError, match=r"0\.3 s budget"):
        lm.get_json("/v1/models")


def test_the_watchdog_is_woken_only_for_a_new_earliest_deadline():
    """Most calls end after one already watched: waking the thread for each cost
    every request a thread switch (and the GIL) for nothing."""
    from llm_service.lmstudio.watchdog import Watchdog

    watchdog = Watchdog()
    wakes = []
    original = watchdog._cond.notify
    watchdog._cond.notify = lambda *a: (wakes.append(1), original(*a))
    now = time.monotonic()
    scopes = [CallScope() for _ in range(50)]
    for offset, scope in enumerate(scopes):
        watchdog.schedule(scope, now + 30 + offset)
    assert len(wakes) == 1  # the first, which was the earliest
    urgent = CallScope()
    urgent.deadline = now + 0.2
    watchdog.schedule(urgent, urgent.deadline)
    assert len(wakes) == 2
    deadline = time.monotonic() + 5
    while urgent.reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert urgent.reason is not None  # expired on time, not 30 s later
    assert time.monotonic() - now < 3
    assert all(scope.reason is None for scope in scopes)


def test_cancelled_before_the_call_sends_nothing(upstream):
    from llm_service.lmstudio import LMStudioCancelledError

    scope = CallScope()
    scope.cancel()
    with pytest.raises(LMStudioCancelledError):
        LMStudioClient(UPSTREAM).get_json("/v1/models", scope=scope)
    assert len(upstream.calls) == 0


def test_a_finished_scope_no_longer_touches_the_pooled_connection(upstream):
    upstream.get(MODELS, json={"data": []})
    scope = CallScope()
    LMStudioClient(UPSTREAM).get_json("/v1/models", scope=scope)
    scope.cancel()  # too late: nothing happens
    assert scope.reason is None


def test_client_hangup_maps_to_499_client_disconnected(app, upstream):
    from llm_service.errors import describe_failure
    from llm_service.lmstudio import LMStudioCancelledError

    with app.test_request_context("/llm/message"):
        failure = describe_failure(LMStudioCancelledError("gone"))
    assert (failure.status, failure.code) == (499, "client_disconnected")


def test_requests_exceptions_still_map(upstream):
    from llm_service.lmstudio import LMStudioConnectionError

    upstream.get(MODELS, body=requests.ConnectionError("refused"))
    with pytest.raises(LMStudioConnectionError):
        LMStudioClient(UPSTREAM, retries=0).get_json("/v1/models")


def test_the_watchdog_forgets_finished_calls_long_before_their_deadlines():
    """Memory stays bounded by the calls running, not by the rate x the budget."""
    from llm_service.lmstudio.watchdog import Watchdog

    watchdog = Watchdog()
    running = []
    now = time.monotonic()
    for number in range(10 * Watchdog.COMPACT_EVERY):
        scope = CallScope()
        scope.deadline = now + 60
        watchdog.schedule(scope, scope.deadline)
        if number % 100 == 0:
            running.append(scope)  # a few calls still going
        else:
            scope.finish()
    assert len(running) <= watchdog.pending() <= len(running) + Watchdog.COMPACT_EVERY
    # The running ones are still watched: their deadline still ends them.
    late = CallScope()
    late.deadline = time.monotonic() + 0.2
    watchdog.schedule(late, late.deadline)
    deadline = time.monotonic() + 5
    while late.reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late.reason is not None


def test_a_deadline_too_far_to_wait_for_leaves_the_watchdog_running():
    """A budget of ``inf`` (the settings take it) must not end the thread."""
    from llm_service.lmstudio.watchdog import Watchdog

    watchdog = Watchdog()
    endless = CallScope()
    endless.deadline = float("inf")
    watchdog.schedule(endless, endless.deadline)
    time.sleep(0.1)  # the thread now waits for that deadline
    soon = CallScope()
    soon.deadline = time.monotonic() + 0.2
    watchdog.schedule(soon, soon.deadline)
    deadline = time.monotonic() + 5
    while soon.reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert soon.reason is not None
    assert endless.reason is None
