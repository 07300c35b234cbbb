"""What a frozen Redis costs the gateway: latency while the limit store is stopped.

    python -m bench.frozen_redis [--before DIR] [--seconds 8] [--clients 4]

Starts a real ``redis-server``, the fake LM Studio (in this process) and the
gateway under its shipped ``gunicorn.conf.py`` with
``LLM_SERVICE_RATE_LIMIT_STORAGE_URI`` pointing at that Redis. Clients then
POST ``/llm/message`` for ``--seconds`` in each phase: Redis up, Redis frozen
(``SIGSTOP``), Redis back (``SIGCONT``). Each phase prints the request count,
p50 / p99 / max latency, and how many answers were 5xx or got no answer within
15 s. ``--before DIR`` measures another checkout first (e.g. the code before a
fix, ``git archive <ref> | tar -x -C DIR``) so both are printed side by side.
Loopback only; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.procs import Processes, free_port, http_status

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.lmstudio import FakeLMStudio  # noqa: E402

HELLO = {"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]}
REQUEST_TIMEOUT = 15.0
PHASES = ("redis up", "redis frozen", "redis back")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _hammer(url: str, seconds: float, clients: int) -> dict:
    """POST from ``clients`` threads for ``seconds``; return latency and failures."""
    latencies: list[float] = []
    failures = {"5xx": 0, "no answer": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    status = session.post(
                        f"{url}/llm/message", json=HELLO, timeout=REQUEST_TIMEOUT
                    ).status_code
                except requests.RequestException:
                    status = None
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if status is None:
                        failures["no answer"] += 1
                    elif status >= 500:
                        failures["5xx"] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + REQUEST_TIMEOUT + 5)
    return {
        "requests": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * _percentile(latencies, 0.99) if latencies else None,
        "max_ms": 1000 * max(latencies) if latencies else None,
        **failures,
    }


def _storage_state(url: str) -> str:
    try:
        return (
            requests.get(f"{url}/health", timeout=5)
            .json()
            .get("rate_limit_storage", "(not reported)")
        )
    except (requests.RequestException, ValueError):
        return "(no answer)"


def measure(gateway_dir: Path, seconds: float, clients: int, log_dir: Path) -> dict:
    """Run the three phases against the gateway in ``gateway_dir``."""
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        sys.exit("redis-server is missing: run `make system-packages`")
    results: dict = {}
    with FakeLMStudio() as fake, Processes(log_dir) as procs:
        redis_port, gateway_port = free_port(), free_port()
        redis = procs.start(
            "redis",
            [
                *(redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE")}
        env.update(
            LLM_SERVICE_ENV_FILE=os.devnull,
            LLM_SERVICE_LM_STUDIO_URL=fake.url,
            LLM_SERVICE_RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{redis_port}/0",
            LLM_SERVICE_RATE_LIMIT_REQUESTS="1000000",
            LLM_SERVICE_LOG_LEVEL="WARNING",
            GUNICORN_BIND=f"127.0.0.1:{gateway_port}",
        )
        gateway = procs.start(
            "gateway",
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            env=env,
            cwd=gateway_dir,
            stop_signal=signal.SIGQUIT,
        )
        deadline = time.monotonic() + 10
        while http_status("127.0.0.1", redis_port, "/") is None:
            # redis answers HTTP with an error and a close: any answer is "up".
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        gateway.wait_http("127.0.0.1", gateway_port, "/health/live", 30)
        url = f"http://127.0.0.1:{gateway_port}"
        try:
            for phase in PHASES:
                if phase == "redis frozen":
                    os.kill(redis.pid, signal.SIGSTOP)
                elif phase == "redis back":
                    os.kill(redis.pid, signal.SIGCONT)
                results[phase] = _hammer(url, seconds, clients)
                results[phase]["storage"] = _storage_state(url)
        finally:
            os.kill(redis.pid, signal.SIGCONT)
    return results


def _row(label: str, phase: str, figures: dict) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:8.1f}"

    return (
        f"{label:<7} {phase:<13} {figures['requests']:>6} {ms(figures['p50_ms'])} "
        f"{ms(figures['p99_ms'])} {ms(figures['max_ms'])} {figures['5xx']:>5} "
        f"{figures['no answer']:>9}  {figures['storage']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to measure")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    runs = [("before", args.before)] if args.before else []
    runs.append(("after" if args.before else "now", ROOT))
    print(
        f"{'code':<7} {'phase':<13} {'reqs':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'5xx':>5} {'no answer':>9}  limit storage (/health)"
    )
    for label, directory in runs:
        with tempfile.TemporaryDirectory(prefix="bench-frozen-redis-") as logs:
            results = measure(directory, args.seconds, args.clients, Path(logs))
        for phase in PHASES:
            print(_row(label, phase, results[phase]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
