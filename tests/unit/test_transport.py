"""The client's lean transport: pools and targets looked up once, no cookies."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm_service.lmstudio import LMStudioClient, LMStudioProtocolError
from llm_service.lmstudio.transport import CACHE_ENTRIES, LeanAdapter


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
