"""What metrics cost a request: p50 latency with metrics on vs off, same run.

    python -m bench.metrics_overhead [--requests 3000] [--block 100] [--path P ...]

Starts the fake LM Studio (in this process) and two gateways under the shipped
``gunicorn.conf.py`` (one worker each, so multiprocess metrics files are
written as in production): one with ``LLM_SERVICE_METRICS=true`` (the
default), one with ``false``. One client then sends the same requests to both,
alternating blocks of ``--block`` requests so that both see the same machine
noise, and prints each side's p50 / p90 latency and the difference of the
medians (the target: at most 0.1 ms). By default two kinds of request:
``GET /health/live`` (no upstream: the request hooks alone, the most precise
figure) and non-streamed chat completions (every metric a generation feeds:
overhead, upstream latency, tokens, in-flight gauges, the status window; the
fake's answers take far longer, so its figure is noisier). Loopback only;
both gateways are stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.procs import Processes, free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.lmstudio import FakeLMStudio  # noqa: E402

CHAT = {"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]}
SIDES = ("metrics on", "metrics off")


def _quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _start(procs: Processes, name: str, fake_url: str, metrics: bool) -> str:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        LLM_SERVICE_ENV_FILE=os.devnull,
        LLM_SERVICE_LM_STUDIO_URL=fake_url,
        LLM_SERVICE_RATE_LIMIT_REQUESTS="100000000",
        LLM_SERVICE_LOG_LEVEL="WARNING",
        LLM_SERVICE_METRICS="true" if metrics else "false",
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="1",
    )
    gateway = procs.start(
        name,
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        env=env,
        cwd=ROOT,
        stop_signal=signal.SIGQUIT,
    )
    gateway.wait_http("127.0.0.1", port, "/health/live", 30)
    return f"http://127.0.0.1:{port}"


def measure(
    total: int, block: int, paths: list[str], log_dir: Path
) -> dict[str, dict[str, list[float]]]:
    """Start both gateways; measure each path in turn."""
    with FakeLMStudio() as fake, Processes(log_dir) as procs:
        urls = {
            side: _start(procs, side.replace(" ", "-"), fake.url, side == SIDES[0])
            for side in SIDES
        }
        return {path: _alternate(urls, total, block, path) for path in paths}


def _alternate(
    urls: dict[str, str], total: int, block: int, path: str
) -> dict[str, list[float]]:
    """Alternate blocks of requests between both gateways; return latencies."""
    latencies: dict[str, list[float]] = {side: [] for side in SIDES}
    sessions = {side: requests.Session() for side in SIDES}
    body = CHAT if path.startswith("/v1/chat") else None
    method = "POST" if body else "GET"
    for side in SIDES:  # warm up: connections, first probes, code paths
        for _ in range(50):
            sessions[side].request(method, urls[side] + path, json=body)
    done = 0
    while done < total:
        for side in SIDES:
            session, url = sessions[side], urls[side] + path
            for _ in range(block):
                started = time.perf_counter()
                answer = session.request(method, url, json=body, timeout=10)
                elapsed = time.perf_counter() - started
                if answer.status_code != 200:
                    sys.exit(f"{side}: {path} answered {answer.status_code}")
                latencies[side].append(elapsed)
        done += block
    for session in sessions.values():
        session.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per side")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument(
        "--path", nargs="+", default=["/health/live", "/v1/chat/completions"]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as logs:
        results = measure(args.requests, args.block, args.path, Path(logs))
    print(f"{args.requests} requests per side and path, blocks of {args.block}")
    print(f"{'path':<22} {'side':<12} {'p50 ms':>8} {'p90 ms':>8}")
    for path, latencies in results.items():
        medians = {}
        for side in SIDES:
            values = latencies[side]
            medians[side] = statistics.median(values)
            print(
                f"{path:<22} {side:<12} {1000 * medians[side]:8.3f} "
                f"{1000 * _quantile(values, 0.9):8.3f}"
            )
        added = 1000 * (medians[SIDES[0]] - medians[SIDES[1]])
        verdict = "within" if added <= 0.1 else "OVER"
        print(f"{path:<22} added by metrics (p50): {added:+.3f} ms ({verdict} 0.1 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
