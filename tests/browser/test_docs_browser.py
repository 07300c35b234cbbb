"""/docs in a real browser: headless Chromium, driven by Playwright.

The real gateway under gunicorn, in front of the fake LM Studio, serves Swagger
UI. The page must render every blueprint's operations, run "Try it out" on
``GET /health`` and show its answer, and never reach past the gateway's origin
(it must work offline) nor trip its own Content-Security-Policy.

Chromium is Debian's (``scripts/install-system-packages.sh`` installs it);
Playwright only drives it and never downloads a browser of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Page, sync_playwright

from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import GatewayServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/llm-service-docs.png")
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def gateway():
    with FakeLMStudio() as fake, GatewayServer({"LM_STUDIO_URL": fake.url}) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/install-system-packages.sh "
            "(make system-packages)."
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


@dataclass
class Visit:
    """A page, with every request it made and every console line it wrote."""

    page: Page
    requested: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


@pytest.fixture
def visit(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    visit = Visit(context.new_page())
    visit.page.set_default_timeout(TIMEOUT_MS)
    visit.page.on("request", lambda request: visit.requested.append(request.url))
    visit.page.on("console", lambda line: visit.console.append(line.text))
    yield visit
    context.close()


def leaves(url: str, origin: str) -> bool:
    """Tell whether fetching ``url`` goes past ``origin`` (data: URLs do not)."""
    parts = urlsplit(url)
    return parts.scheme != "data" and f"{parts.scheme}://{parts.netloc}" != origin


def test_docs_render_and_try_it_out_works_offline(gateway, visit):
    spec = requests.get(f"{gateway.url}/openapi.json", timeout=5).json()
    page = visit.page
    page.goto(f"{gateway.url}/docs")
    page.wait_for_selector(".opblock")

    # Every blueprint has its section, with each of its operations (the ids are
    # Swagger UI's: operations-tag-<tag>, operations-<tag>-<operationId>).
    tags = [tag["name"] for tag in spec["tags"]]
    assert {"health", "message", "openai", "docs"} <= set(tags)
    for tag in tags:
        assert page.locator(f"#operations-tag-{tag}").is_visible(), tag
    for item in spec["paths"].values():
        for operation in item.values():
            tag, operation_id = operation["tags"][0], operation["operationId"]
            assert page.locator(f"#operations-{tag}-{operation_id}").is_visible()

    # Try it out -> Execute on GET /health, and the answer shows in the page.
    health = page.locator("#operations-health-health_health")
    health.locator(".opblock-summary").click()
    health.locator("button.try-out__btn").click()
    health.locator("button.execute").click()
    answer = health.locator(".live-responses-table .response")
    answer.locator(".response-col_status", has_text="200").wait_for()
    body = answer.locator(".response-col_description pre").first.inner_text()
    assert '"status": "ok"' in body
    assert '"reachable": true' in body
    answer.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT))

    assert f"{gateway.url}/openapi.json" in visit.requested
    assert f"{gateway.url}/health" in visit.requested
    outside = [url for url in visit.requested if leaves(url, gateway.url)]
    assert not outside, f"requests past the gateway's origin: {outside}"
    refused = [line for line in visit.console if "Content Security" in line]
    assert not refused, f"the page trips its own policy: {refused}"
