"""The client's lean transport: pools and targets looked up once, no cookies."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from requests.cookies import RequestsCookieJar
from requests.models import Response
from requests.utils import default_headers

from llm_service.lmstudio import CallScope, LMStudioClient, LMStudioProtocolError
from llm_service.lmstudio.transport import (
    CACHE_ENTRIES,
    Headers,
    LeanAdapter,
    LeanResponse,
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a pooled connection is reused

    def do_GET(self) -> None:
        self.server.seen.append(
            {"cookie": self.headers.get("Cookie"), "port": self.client_address[1]}
        )
        if self.path == "/v1/moved":
            self.send_response(302)
            self.send_header("Location", "/v1/models")
            self.send_header("Set-Cookie", "session=caller-a; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "session=caller-a; Path=/")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_an_upstream_cookie_is_never_kept_nor_sent_back(server):
    lm = LMStudioClient(_url(server))
    try:
        lm.list_models()
        lm.list_models()
    finally:
        lm.close()
    assert [seen["cookie"] for seen in server.seen] == [None, None]
    assert len(lm.session.cookies) == 0


def test_calls_share_one_pool_and_its_connection(server):
    lm = LMStudioClient(_url(server))
    try:
        lm.list_models()
        pools = set(map(id, lm.adapter._pools.values()))
        lm.list_models()
        assert set(map(id, lm.adapter._pools.values())) == pools
    finally:
        lm.close()
    assert len(pools) == 1
    # One kept-alive connection served both calls.
    assert len({seen["port"] for seen in server.seen}) == 1


def test_a_closed_pool_is_never_handed_out_again(server):
    lm = LMStudioClient(_url(server))
    try:
        lm.list_models()
        (pool,) = lm.adapter._pools.values()
        # Forgotten by the pool manager, and closed.
        lm.adapter.poolmanager.clear()
        pool.close()
        assert lm.list_models() == ["m"]
        (fresh,) = lm.adapter._pools.values()
    finally:
        lm.close()
    assert fresh is not pool


def test_the_target_goes_through_a_configured_proxy():
    """With a proxy the target is the absolute URL, as requests would send it."""
    import requests

    adapter = LeanAdapter()
    request = requests.Request("GET", "http://upstream.test:1234/v1/models").prepare()
    direct = adapter.request_url(request, {})
    proxied = adapter.request_url(request, {"http": "http://proxy.test:3128"})
    assert (direct, proxied) == ("/v1/models", "http://upstream.test:1234/v1/models")


def test_the_caches_stay_bounded():
    import requests

    adapter = LeanAdapter()
    for n in range(CACHE_ENTRIES * 3):
        request = requests.Request("GET", f"http://upstream.test/{n}").prepare()
        adapter.request_url(request, {})
    assert len(adapter._targets) <= CACHE_ENTRIES


@pytest.mark.parametrize("through_session", [False, True])
def test_a_redirect_is_refused_either_way(server, through_session):
    """Through the session (OpenTelemetry's spans) or not: never followed."""
    lm = LMStudioClient(_url(server), retries=0)
    lm.through_session = through_session
    try:
        with pytest.raises(LMStudioProtocolError, match="redirected"):
            lm.get_json("/v1/moved")
        assert lm.list_models() == ["m"]
    finally:
        lm.close()
    assert [seen["cookie"] for seen in server.seen] == [None, None]


# -- headers and answers, built without requests' per-call work -------------


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers a POST with the request's headers and a repeated header."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"headers": list(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repeated", "a")
        self.send_header("X-Repeated", "b")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def echo():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_call_sends_the_sessions_headers_then_its_own(echo):
    """Each header once, in order; a call's header replaces a session's of any case."""
    cid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    lm = LMStudioClient(
        echo,
        api_token="tok",
        via="llm-service-1",
        correlation_id=lambda: cid,
        extra_headers=lambda: {"traceparent": "00-ab-cd-01", "accept": "text/x"},
    )
    try:
        body = lm.post_json("/v1/echo", {"a": 1})
    finally:
        lm.close()
    sent = body["headers"]
    names = [name.lower() for name, _ in sent]
    assert len(names) == len(set(names))
    assert dict(sent) == {
        "Host": echo.removeprefix("http://"),
        "User-Agent": "llm-service",
        "Accept-Encoding": default_headers()["Accept-Encoding"],
        "accept": "text/x",
        "Connection": "keep-alive",
        "Authorization": "Bearer tok",
        "Via": "1.1 llm-service-1",
        "traceparent": "00-ab-cd-01",
        "X-Correlation-ID": cid,
        "X-Request-ID": cid,
        "Content-Type": "application/json",
        "Content-Length": str(len(b'{"a": 1}')),
    }


def test_an_answers_headers_read_as_requests_reads_them(echo):
    """Case-insensitive, a repeated header's values joined."""
    lm = LMStudioClient(echo)
    try:
        response = lm._send(
            "POST",
            "/v1/echo",
            json={},
            correlation_id=None,
            connect_timeout=5,
            read_timeout=5,
            scope=CallScope(),
            deadline=None,
        )
    finally:
        lm.close()
    assert response.headers["x-repeated"] == "a, b"
    assert response.headers["CONTENT-TYPE"] == "application/json"
    assert "X-Repeated" in list(response.headers)
    assert response.json()["headers"]


def test_headers_copy_apart_and_list_their_pairs():
    headers = Headers.of([("Accept", "a"), ("X-One", "1"), ("accept", "b")])
    copied = headers.copy()
    copied["X-Two"] = "2"
    assert isinstance(copied, Headers)
    assert list(headers.items()) == [("accept", "b"), ("X-One", "1")]
    assert headers["ACCEPT"] == "b"
    assert "x-two" not in headers
    assert dict(copied.items()) == {"accept": "b", "X-One": "1", "X-Two": "2"}
    assert Headers({"A": "1"}) == {"a": "1"}


def test_a_lean_response_is_a_requests_response_with_a_lazy_jar():
    """Every attribute requests' own Response sets (a requests upgrade adding one
    fails here), and an empty cookie jar once asked for."""
    plain, lean = Response(), LeanResponse()
    assert set(vars(lean)) == set(vars(plain)) - {"cookies"}
    for name in vars(lean):
        assert getattr(lean, name) == getattr(plain, name), name
    assert isinstance(lean.cookies, RequestsCookieJar)
    assert len(lean.cookies) == 0
    assert lean.cookies is lean.cookies
    jar = RequestsCookieJar()
    lean.cookies = jar
    assert lean.cookies is jar
