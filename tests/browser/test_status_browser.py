"""/status in a real browser: headless Chromium, driven by Playwright.

The gateway runs under gunicorn with two workers in front of the fake LM
Studio. The page must render the host and the traffic of both workers, show
the host going down within one of its own refreshes once the fake stops, fetch
nothing from another origin and trip nothing of its Content-Security-Policy.
Screenshots of both states are saved as test artifacts.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
import requests

from llm_service.status import REFRESH_SECONDS
from tests.browser.test_docs_browser import browser, leaves, visit  # noqa: F401
from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import GatewayServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", tempfile.gettempdir()))
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_status_page_shows_the_host_going_down(visit):  # noqa: F811
    with FakeLMStudio() as fake:
        settings = {"LM_STUDIO_URL": fake.url, "HEALTH_CACHE_SECONDS": 0}
        with GatewayServer(settings, workers=2) as gateway:
            for _ in range(6):
                answer = requests.post(
                    f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10
                )
                assert answer.status_code == 200
            page = visit.page
            page.goto(f"{gateway.url}/status")
            host = page.locator("#hosts tr.host")
            assert host.count() == 1
            assert host.locator(".state").inner_text() == "up"
            assert fake.loaded[0] in host.inner_text()
            # Every worker's traffic: the six calls, whoever serves the page.
            first_row = page.locator("#traffic tbody tr").first
            assert int(first_row.locator(".requests").inner_text()) >= 6
            page.screenshot(path=str(ARTIFACTS / "llm-service-status-up.png"))

            fake.stop()
            stopped = time.monotonic()
            # The page reloads itself; the next one shows the host down.
            page.wait_for_selector(
                "#hosts tr.host.down", timeout=(REFRESH_SECONDS + 5) * 1000
            )
            assert time.monotonic() - stopped < REFRESH_SECONDS + 5
            assert page.locator("#hosts .state").inner_text() == "down"
            assert "refused" in page.locator("#hosts .detail").inner_text()
            page.screenshot(path=str(ARTIFACTS / "llm-service-status-down.png"))

    origin = gateway.url
    assert visit.requested, "the page made no request at all"
    assert not [url for url in visit.requested if leaves(url, origin)]
    assert f"{origin}/status/style.css" in visit.requested
    assert not [line for line in visit.console if "Content Security Policy" in line]
