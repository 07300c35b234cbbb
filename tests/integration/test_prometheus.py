"""A real Prometheus scrapes the gateway under gunicorn with two workers.

Prometheus (Debian's package; ``scripts/install-system-packages.sh``) runs with
a temporary configuration and data directory on a free loopback port and
scrapes ``/metrics`` every second. The test sends known traffic and asks
Prometheus, over its HTTP API, for the exact counter delta and for an overhead
quantile computed over several scrapes: what an operator's dashboard would.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import GatewayServer, free_port

pytestmark = pytest.mark.slow

PROMETHEUS = Path(os.environ.get("PROMETHEUS", "/usr/bin/prometheus"))
ROUTE = "/v1/chat/completions"
CHAT = {"model": "loaded-model", "messages": [{"role": "user", "content": "hi"}]}
SCRAPE_SECONDS = 1
#: Requests sent, non-streamed and streamed: the delta Prometheus must report.
PLAIN, STREAMED = 24, 8


class Prometheus:
    """A Prometheus server scraping one target, in a temporary directory."""

    def __init__(self, target: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = Path(self.dir.name, "prometheus.yml")
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_SECONDS}s\n"
            f"  scrape_timeout: {SCRAPE_SECONDS}s\n"
            "scrape_configs:\n"
            "  - job_name: llm-service\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = Path(self.dir.name, "prometheus.log")
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={Path(self.dir.name, 'data')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready:\n{self.log.read_text()}")

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = requests.get(f"{self.url}/api/v1/query", params=params, timeout=5)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str, at: float | None = None) -> float | None:
        result = self.query(promql, at)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log_file.close()
        self.dir.cleanup()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout} s: {predicate}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not PROMETHEUS.exists():
        pytest.fail(
            f"{PROMETHEUS} is missing: run scripts/install-system-packages.sh "
            "(make system-packages)."
        )
    metrics_dir = tmp_path_factory.mktemp("metrics")
    with FakeLMStudio(models=["loaded-model"], loaded=["loaded-model"]) as fake:
        gateway = GatewayServer(
            {"LM_STUDIO_URL": fake.url, "RATE_LIMIT_REQUESTS": 100000},
            workers=2,
            threads=16,
        )
        # A directory the test can look into (gunicorn.conf.py leaves a given
        # one in place); normally each run makes its own.
        gateway.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        with gateway:
            prometheus = Prometheus(f"127.0.0.1:{gateway.port}")
            try:
                prometheus.wait_ready()
                yield fake, gateway, prometheus, metrics_dir
            finally:
                prometheus.stop()


def _send(gateway: GatewayServer, streamed: bool) -> int:
    answer = requests.post(
        f"{gateway.url}{ROUTE}", json={**CHAT, "stream": streamed}, timeout=30
    )
    answer.content  # noqa: B018 - read the whole stream
    return answer.status_code


def test_prometheus_sees_the_exact_traffic_and_the_overhead(stack):
    fake, gateway, prometheus, metrics_dir = stack
    ok = f'llm_service_requests_total{{route="{ROUTE}",status_class="2xx"}}'
    total = f"sum({ok})"

    # One request first, so the series exists; then a value two scrapes agree on.
    assert _send(gateway, streamed=False) == 200
    wait_for(lambda: prometheus.scalar(total) == 1.0)
    before_at = time.time()
    assert prometheus.scalar(total, before_at) == 1.0

    # Slow answers and many at once, so both workers take a share.
    fake.first_token_delay = 0.1
    with ThreadPoolExecutor(16) as pool:
        kinds = [False] * PLAIN + [True] * STREAMED
        statuses = list(pool.map(lambda s: _send(gateway, s), kinds))
    fake.first_token_delay = 0.0
    assert statuses == [200] * (PLAIN + STREAMED)
    # Both workers counted some of it (one counter file per worker process).
    pids = {
        match[1]
        for name in os.listdir(metrics_dir)
        if (match := re.fullmatch(r"counter_(\d+)\.db", name))
    }
    assert len(pids) >= 2, sorted(os.listdir(metrics_dir))

    # Exact: every request once, whichever worker served it and scraped.
    wait_for(lambda: prometheus.scalar(total) == 1.0 + PLAIN + STREAMED)
    after_at = time.time()
    delta = prometheus.scalar(total, after_at) - prometheus.scalar(total, before_at)
    assert delta == PLAIN + STREAMED

    # The overhead's median over the last scrapes: at least two of them carry it.
    window = "30s"
    overhead = "llm_service_gateway_overhead_seconds"
    scrapes = prometheus.scalar(
        f'count_over_time({overhead}_count{{route="{ROUTE}"}}[{window}])'
    )
    assert scrapes is not None
    assert scrapes >= 2
    median = prometheus.scalar(
        "histogram_quantile(0.5, sum by (le) "
        f'(rate({overhead}_bucket{{route="{ROUTE}"}}[{window}])))'
    )
    assert median is not None
    # Each request waited 0.1 s upstream: the gateway's own share is far less.
    assert 0 < median < 0.05, median
    count = prometheus.scalar(f'sum({overhead}_count{{route="{ROUTE}"}})')
    assert count == 1.0 + PLAIN + STREAMED

    # Tokens and first tokens by model, in-flight back to zero.
    assert prometheus.scalar(
        'sum(llm_service_tokens_total{model="loaded-model",direction="completion"})'
    )
    assert prometheus.scalar(
        "sum(llm_service_upstream_time_to_first_token_seconds_count"
        '{model="loaded-model"})'
    ) == float(STREAMED)
    wait_for(lambda: prometheus.scalar("sum(llm_service_requests_in_flight)") == 1.0)
