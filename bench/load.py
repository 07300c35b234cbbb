"""Load generation: wrk for throughput, a keep-alive loop for latency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .contenders import Target
from .wire import KeepAliveClient

WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")


def wrk_version() -> str | None:
    """Return wrk's version line, or None when it is not installed."""
    binary = shutil.which("wrk")
    if binary is None:
        return None
    # wrk has no --version; its usage text starts with the version.
    result = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    )
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0].split(" Copyright")[0].removeprefix("wrk ") if text else "unknown"


def run_wrk(
    target: Target,
    connections: int,
    seconds: float,
    *,
    threads: int = 1,
) -> dict:
    """Run wrk against a target; return requests/s, errors and latencies.

    One wrk thread by default: wrk is far faster than any contender here, and
    every core it does not use is one the contender can.
    """
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed: run bench/install-tools.sh")
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        body.write(target.body)
        body.flush()
        env = dict(os.environ, WRK_BODY_FILE=body.name)
        env["WRK_AUTHORIZATION"] = target.headers.get("Authorization", "")
        url = f"http://{target.host}:{target.port}{target.path}"
        argv = [binary, "-t", str(min(threads, connections)), "-c", str(connections)]
        argv += ["-d", f"{max(1, round(seconds))}s", "--timeout", "10s"]
        argv += ["-s", str(WRK_SCRIPT), url]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            timeout=seconds + 60,
            check=False,
        )
    for line in result.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            summary = json.loads(line.removeprefix("WRK_JSON "))
            break
    else:
        raise RuntimeError(
            f"wrk gave no summary (exit {result.returncode}): "
            f"{(result.stderr or result.stdout)[-500:]}"
        )
    duration = summary["duration_us"] / 1e6
    socket_errors = sum(
        summary[k]
        for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return {
        "rps": summary["requests"] / duration if duration else 0.0,
        "requests": summary["requests"],
        "seconds": round(duration, 3),
        "non_2xx": summary["non_2xx"],
        "socket_errors": socket_errors,
        "latency_p50_ms": summary["latency_p50_us"] / 1000,
        "latency_p99_ms": summary["latency_p99_us"] / 1000,
    }


def sequential(
    targets: Sequence[Target], requests: int, warmup: int
) -> dict[str, dict]:
    """Time ``requests`` requests per target, one at a time, interleaved.

    Interleaving (direct, gateway, bare, direct, gateway, ...) exposes every
    target to the same moments of machine noise, so their difference is fair.
    Returns per target the latencies in nanoseconds and the error count.
    """
    clients = {
        t.key: KeepAliveClient(t.host, t.port, t.path, t.body, t.headers)
        for t in targets
    }
    results: dict[str, dict] = {t.key: {"ns": [], "errors": 0} for t in targets}
    try:
        for _ in range(warmup):
            for client in clients.values():
                client.post()
        for i in range(requests):
            # Rotate the order so no target always runs right after another.
            order = list(clients.items())
            shift = i % len(order)
            for key, client in order[shift:] + order[:shift]:
                status, elapsed = client.post()
                if status is not None and 200 <= status < 300:
                    results[key]["ns"].append(elapsed)
                else:
                    results[key]["errors"] += 1
    finally:
        for client in clients.values():
            client.close()
    return results
