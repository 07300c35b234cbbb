"""Slow clients and hostile upstreams: what they cost the gateway's worker.

Three scenarios, each against the fake LM Studio (run as its own process, its
faults picked by the model name) and the gateway under its shipped
``gunicorn.conf.py``:

- ``slow-readers`` (issue 9, item 3): 10 clients start a stream of 300 MB each
  (``fault:flood``) and stop reading. Reported: the worker's RSS growth, and
  when the gateway let go of the last upstream connection (it must by
  ``STREAM_TOTAL_TIMEOUT``).
- ``big-answers`` (item 12): five concurrent 50 MB non-streamed answers, with a
  ``Content-Length`` and then chunked. Reported: the worker's peak RSS during
  the round and its RSS after, and the statuses.
- ``long-line`` (item 14): one stream whose single line is 40 MB with no line
  end. Reported: the worker's CPU seconds until the stream ended.
- ``parser`` (item 14): the SSE parser alone, in this process, fed that line
  in 64 KiB pieces without its line limit: the algorithm's own cost.

Run ``python -m bench.slow_reader`` (``--gateway-dir /path/to/other/checkout``
measures another version of the gateway, e.g. before a fix; the fake always
comes from this checkout). ``--runs N`` repeats each scenario and reports
medians. Loopback only; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import sysinfo
from bench.contenders import clean_env
from bench.procs import Processes, free_port, raise_fd_limit

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
CLIENT_RCVBUF = 64 * 1024


def start_fake(procs: Processes) -> int:
    port = free_port()
    argv = [sys.executable, "-m", "tests.fakes.lmstudio", "--port", str(port)]
    child = procs.start("fake-lmstudio", argv, env=clean_env(), cwd=ROOT)
    child.wait_http(HOST, port, "/v1/models", timeout=20)
    return port


def start_gateway(
    procs: Processes, fake_port: int, gateway_dir: Path, settings: dict
) -> tuple[int, int]:
    """Start the gateway; return its port and its (single) worker's pid."""
    port = free_port()
    env = clean_env()
    env.update(
        {
            "GUNICORN_BIND": f"{HOST}:{port}",
            "LLM_SERVICE_ENV_FILE": os.devnull,
            "LLM_SERVICE_LM_STUDIO_URL": f"http://{HOST}:{fake_port}",
            "LLM_SERVICE_RATE_LIMIT_REQUESTS": "1000000000",
            "LLM_SERVICE_LOG_LEVEL": "WARNING",
            **{f"LLM_SERVICE_{k}": str(v) for k, v in settings.items()},
        }
    )
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    child = procs.start(
        "gateway", argv, env=env, cwd=gateway_dir, stop_signal=signal.SIGQUIT
    )
    child.wait_http(HOST, port, "/health/live", timeout=30)
    workers = sysinfo.children(child.pid)
    return port, workers[0]


def request_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def chat(model: str, stream: bool) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    }


def upstream_connections(fake_port: int) -> int:
    """Count established TCP connections to the fake (the gateway's upstream calls)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == fake_port and fields[3] == "01":
                count += 1
    return count


class Sampler:
    """Sample a value every ``interval`` seconds in a thread."""

    def __init__(self, read, interval: float = 0.1) -> None:
        self.read = read
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.read()
            if value is not None:
                self.samples.append((time.monotonic() - self.started, value))
            self._stop.wait(self.interval)


def rss_mib(pid: int) -> float | None:
    rss = sysinfo.rss_bytes(pid)
    return rss / MIB if rss is not None else None


def slow_readers(port, worker, fake_port, *, clients, flood, total) -> dict:
    before = rss_mib(worker)
    sockets = []
    with (
        Sampler(lambda: rss_mib(worker)) as rss,
        Sampler(lambda: upstream_connections(fake_port)) as upstreams,
    ):
        for _ in range(clients):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
            sock.settimeout(10)
            sock.connect((HOST, port))
            body = chat(f"fault:flood?bytes={flood}", stream=True)
            sock.sendall(request_bytes("/v1/chat/completions", body))
            sock.recv(4096)  # the headers, then nothing more: a client gone still
            sockets.append(sock)
        time.sleep(total + 2.0)
    for sock in sockets:
        sock.close()
    peak = max(value for _, value in rss.samples)
    last_open = max(
        (t for t, n in upstreams.samples if n > 0), default=0.0
    )  # the last moment any upstream call was still open
    return {
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_growth_mib": round(peak - before, 1),
        "upstream_open_until_s": round(last_open, 2)
        if last_open < total + 1.9
        else f">{total + 2:g} (still open)",
        "stream_total_timeout_s": total,
    }


def big_answers(port, worker, *, answers, size, chunked) -> dict:
    before = rss_mib(worker)
    clear = Path(f"/proc/{worker}/clear_refs")
    with contextlib.suppress(OSError):
        clear.write_text("5")  # resets the peak RSS (VmHWM) to the current RSS

    def one() -> int:
        with socket.create_connection((HOST, port), timeout=120) as sock:
            model = f"fault:flood?bytes={size}&chunked={'true' if chunked else 'false'}"
            sock.sendall(request_bytes("/v1/chat/completions", chat(model, False)))
            head = sock.recv(4096)
            while sock.recv(65536):
                pass
        return int(head.split(b" ", 2)[1])

    with Sampler(lambda: rss_mib(worker), 0.05) as rss:
        with concurrent.futures.ThreadPoolExecutor(answers) as pool:
            statuses = list(pool.map(lambda _: one(), range(answers)))
        time.sleep(1.0)
    hwm = sysinfo._status_field(worker, "VmHWM:")
    peak = max([value for _, value in rss.samples] + [hwm / 1024 if hwm else 0])
    return {
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_mib": round(rss_mib(worker), 1),
        "statuses": sorted(set(statuses)),
    }


def long_line(port, worker, *, size) -> dict:
    cpu_before = sysinfo.cpu_seconds(worker)
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=300) as sock:
        body = chat(f"fault:long_line?bytes={size}", stream=True)
        sock.sendall(request_bytes("/v1/chat/completions", body))
        tail = b""
        while data := sock.recv(65536):
            tail = (tail + data)[-2048:]
    elapsed = time.monotonic() - started
    code = None
    for marker in (b"upstream_response_too_large", b"upstream_stream_cut"):
        if marker in tail:
            code = marker.decode()
    return {
        "worker_cpu_s": round(sysinfo.cpu_seconds(worker) - cpu_before, 2),
        "stream_s": round(elapsed, 2),
        "ended_with": code,
    }


def parser_cpu(gateway_dir: Path, *, size: int) -> dict:
    """CPU seconds of the SSE parser alone on one ``size``-byte line, uncapped.

    The parser is loaded from ``gateway_dir`` (it imports only the standard
    library), so the same figure compares two versions.
    """
    path = gateway_dir / "llm_service" / "lmstudio" / "sse.py"
    spec = importlib.util.spec_from_file_location("bench_sse", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    parser = module.SSEParser()  # no line limit: the cost of the algorithm
    piece = b"x" * 65536
    started = time.process_time()
    for _ in range(size // len(piece)):
        parser.feed(piece)
    parser.feed(b"\n\n")
    cpu = time.process_time() - started
    return {"parser_cpu_s": round(cpu, 3), "line_mb": size / 1e6}


def median_of(results: list[dict]) -> dict:
    merged = {}
    for key, value in results[0].items():
        values = [result[key] for result in results]
        if all(isinstance(v, int | float) for v in values):
            merged[key] = round(statistics.median(values), 2)
        else:
            merged[key] = values if len(results) > 1 else value
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_reader")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["slow-readers", "big-answers", "long-line", "parser"],
    )
    parser.add_argument("--gateway-dir", type=Path, default=ROOT)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--flood-mb", type=int, default=300)
    parser.add_argument("--total", type=float, default=15.0)
    parser.add_argument("--answer-mb", type=int, default=50)
    parser.add_argument("--line-mb", type=int, default=40)
    args = parser.parse_args(argv)
    scenarios = args.only or ["slow-readers", "big-answers", "long-line", "parser"]
    raise_fd_limit()
    report: dict[str, dict] = {"gateway_dir": {"path": str(args.gateway_dir)}}
    with tempfile.TemporaryDirectory(prefix="bench-slow-reader-") as logs:
        for scenario in scenarios:
            runs = []
            for _ in range(args.runs):
                if scenario == "parser":
                    runs.append(
                        parser_cpu(args.gateway_dir, size=args.line_mb * 1_000_000)
                    )
                    continue
                # A fresh gateway per run: RSS figures start from the same place.
                with Processes(Path(logs)) as procs:
                    fake_port = start_fake(procs)
                    settings = {"STREAM_TOTAL_TIMEOUT": args.total}
                    port, worker = start_gateway(
                        procs, fake_port, args.gateway_dir, settings
                    )
                    if scenario == "slow-readers":
                        runs.append(
                            slow_readers(
                                port,
                                worker,
                                fake_port,
                                clients=args.clients,
                                flood=args.flood_mb * 1_000_000,
                                total=args.total,
                            )
                        )
                    elif scenario == "big-answers":
                        result = {}
                        for chunked in (False, True):
                            one = big_answers(
                                port,
                                worker,
                                answers=5,
                                size=args.answer_mb * 1_000_000,
                                chunked=chunked,
                            )
                            label = "chunked" if chunked else "content_length"
                            result.update({f"{label}_{k}": v for k, v in one.items()})
                        runs.append(result)
                    else:
                        runs.append(
                            long_line(port, worker, size=args.line_mb * 1_000_000)
                        )
            report[scenario] = median_of(runs)
            print(f"{scenario}: {json.dumps(report[scenario])}", flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
