"""What API keys and per-key quotas add to a request: ``python -m bench.auth_overhead``.

Gateways side by side in one run, in front of the same fake LM Studio, each
under the shipped gunicorn.conf.py (one worker, WARNING logs):

- ``open``: ``LLM_SERVICE_AUTH=off``, no key (the baseline);
- ``key``: a key with no limits (authentication only);
- ``key+quotas``: a key with RPM, TPM and concurrency, per-process counters;
- ``key+quotas redis``: the same with the counters in a local Redis (when
  ``redis-server`` is installed).

Requests are sent one at a time on keep-alive connections, interleaved across
the gateways (rotating the order), so every variant sees the same machine
noise. Usage records are written in every variant, so their cost is not part of
the differences; the open variant pays the per-address limit (in memory), which
keyed callers skip. Prints p50/p90 of the client-side latency and of the
gateway's own ``X-Process-Time``, and each variant's p50 minus the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import contenders
from bench.wire import KeepAliveClient
from tests.databases import RedisServer
from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import ROOT, GatewayServer

BODY = json.dumps(
    {
        "model": "fake-model-1",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    }
).encode()
PATH = "/v1/chat/completions"
LIMITS = ["--rpm", "1000000", "--tpm", "1000000000", "--concurrency", "1000"]


def create_key(database: str, name: str, *options: str) -> str:
    """Create a key in ``database`` with ``flask keys create``; return its secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE_")}
    env.update(LLM_SERVICE_DATABASE_URL=database, LLM_SERVICE_ENV_FILE=os.devnull)
    return contenders.create_key(env, ROOT, name, *options)


class Timed(KeepAliveClient):
    """A keep-alive client that also keeps the gateway's X-Process-Time."""

    def post(self) -> tuple[int | None, int, float | None]:
        if self.conn is None:
            import http.client

            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        started = time.perf_counter_ns()
        self.conn.request("POST", self.path, body=self.body, headers=self.headers)
        response = self.conn.getresponse()
        response.read()
        elapsed = time.perf_counter_ns() - started
        process = response.getheader("X-Process-Time")
        return response.status, elapsed, float(process) if process else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per variant")
    parser.add_argument("--warmup", type=int, default=200, help="per variant")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    database = f"sqlite:///{folder}/gateway.db"
    plain = create_key(database, "plain")
    limited = create_key(database, "limited", *LIMITS)
    redis_server = None
    try:
        redis_server = RedisServer()
    except RuntimeError as err:
        print(f"(no Redis variant: {err})")
    # The open variant's per-address limit counts (in memory) but never refuses.
    common = {
        "DATABASE_URL": database,
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_REQUESTS": 10**9,
    }

    with FakeLMStudio() as fake:
        common["LM_STUDIO_URL"] = fake.url
        variants = {
            "open": ({**common, "AUTH": "off"}, None),
            "key": (common, plain),
            "key+quotas": (common, limited),
        }
        if redis_server is not None:
            redis_settings = {**common, "RATE_LIMIT_STORAGE_URI": redis_server.url}
            variants["key+quotas redis"] = (redis_settings, limited)
        servers = {
            name: GatewayServer(settings) for name, (settings, _) in variants.items()
        }
        try:
            for server in servers.values():
                server.start()
            clients = {}
            for name, (_, key) in variants.items():
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                clients[name] = Timed(
                    "127.0.0.1", servers[name].port, PATH, BODY, headers
                )
            results = {name: {"client": [], "gateway": []} for name in variants}
            order = list(clients)
            for i in range(args.warmup + args.requests):
                shift = i % len(order)
                for name in order[shift:] + order[:shift]:
                    status, elapsed, process = clients[name].post()
                    if status != 200:
                        raise SystemExit(f"{name}: HTTP {status}")
                    if i >= args.warmup:
                        results[name]["client"].append(elapsed / 1e6)
                        results[name]["gateway"].append(process * 1000)
        finally:
            for server in servers.values():
                server.stop()
            if redis_server is not None:
                redis_server.stop()

    base_client = statistics.median(results["open"]["client"])
    base_gateway = statistics.median(results["open"]["gateway"])
    print(
        f"{args.requests} sequential requests per variant, interleaved "
        f"(after {args.warmup} warm-up); times in ms\n"
    )
    header = (
        f"{'variant':<18}{'client p50':>11}{'p90':>8}{'added p50':>11}"
        f"{'gateway p50':>13}{'p90':>8}{'added p50':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, figures in results.items():
        client, gateway = figures["client"], figures["gateway"]
        c50, g50 = statistics.median(client), statistics.median(gateway)
        print(
            f"{name:<18}{c50:>11.3f}{percentile(client, 0.9):>8.3f}"
            f"{c50 - base_client:>+11.3f}{g50:>13.3f}"
            f"{percentile(gateway, 0.9):>8.3f}{g50 - base_gateway:>+11.3f}"
        )
    print(
        "\n'added' = variant p50 - open p50. client: request sent to answer read; "
        "gateway: X-Process-Time (hooks to the response's headers)."
    )
    print(f"\nkey check alone (hash + constant-time compare): {key_check_us():.2f} us")
    return 0


def key_check_us(rounds: int = 200_000) -> float:
    """Microseconds per KeySet.check of a valid key, in this process."""
    from llm_service.auth import Caller, KeySet, _Entry, new_key

    key, lookup, digest = new_key()
    entry = _Entry(Caller(name="k", key_id=1), bytes.fromhex(digest), None, False)
    keys = KeySet({lookup: entry}, ever=True)
    started = time.perf_counter()
    for _ in range(rounds):
        keys.check(key, 0.0)
    return (time.perf_counter() - started) / rounds * 1e6


if __name__ == "__main__":
    sys.exit(main())
