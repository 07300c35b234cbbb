"""Admission under load: ``python -m bench.admission [--only SCENARIO,...]``.

Scenarios, each against real gunicorn with the shipped ``gunicorn.conf.py``:

``hold``
    ``--streams`` streams relayed from a slow host (``bench.stream_upstream``,
    one chunk every ``--chunk-interval`` s; ``UPSTREAM_SLOTS`` = ``--streams``)
    plus ``--queued`` streams waiting for a slot (getting ``: queued``
    comments), all held for ``--for`` s, from 8 client addresses. Meanwhile a
    prober process asks ``/health/live`` every 100 ms; the gateway's RSS
    (master + workers) and thread count are sampled every second.
``fairness``
    A fake host that takes ``--service`` s per answer, 2 slots. Client A
    (127.0.0.2) sends 200 requests at once; client B (127.0.0.3) one per
    second: B's waits (``X-Queue-Time``) against one service time. Then four
    clients send 50 requests each at once: Jain's index of what each got
    served while all four were waiting. Run with 1 worker (local slots) and
    with 2 workers sharing slots in Redis (the fair choice is per worker).
``overhead``
    Sequential uncontended requests (keep-alive) through this gateway and
    through the one in ``--before`` (default /work/main, the code without
    admission), alternated in rounds: p50 of each, and the difference. Also
    the in-process cost of ``Admission.enter`` + ``release``.
``slots``
    A fake host with 2 slots (``UPSTREAM_SLOTS=2``) under 200 concurrent
    requests, with 1 and with 2 workers sharing Redis: the most requests the
    fake ever saw at once.

Callers are told apart by client address here (no API keys yet): the fair
queue keys on the key name once keys exist, on the address until then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.procs import Processes, free_port, raise_fd_limit
from bench.upstreams import StreamServer

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}
QUIET = {"LOG_LEVEL": "WARNING", "RATE_LIMIT_REQUESTS": 10_000_000}


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


# -- processes -------------------------------------------------------------------


def start_gateway(
    procs: Processes,
    name: str,
    settings: dict[str, object],
    cwd: Path = ROOT,
    **gunicorn: object,
) -> tuple[object, int]:
    """gunicorn with ``cwd``'s gunicorn.conf.py; clean ``LLM_SERVICE_*`` env."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE_")}
    env = {k: v for k, v in env.items() if not k.startswith("GUNICORN_")}
    env.update({f"LLM_SERVICE_{k}": str(v) for k, v in {**QUIET, **settings}.items()})
    env.update({f"GUNICORN_{k.upper()}": str(v) for k, v in gunicorn.items()})
    env["GUNICORN_BIND"] = f"127.0.0.1:{port}"
    env["LLM_SERVICE_ENV_FILE"] = os.devnull
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    child = procs.start(name, argv, env=env, cwd=cwd, stop_signal=signal.SIGQUIT)
    child.wait_http("127.0.0.1", port, "/health/live", timeout=30)
    return child, port


def start_fake(procs: Processes, name: str, delay: float) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "tests.fakes.lmstudio", "--port", str(port)]
    argv += ["--first-token-delay", str(delay), "--max-connections", "2048"]
    argv += ["--idle-timeout", "60", "--model", "bench-model"]
    child = procs.start(name, argv, cwd=ROOT)
    child.wait_http("127.0.0.1", port, "/v1/models", timeout=15)
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def redis_server(procs: Processes):
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: run make system-packages")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no"]
    child = procs.start("redis", argv)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket_to(port) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                break
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        procs.stop(child)


def socket_to(port: int):
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=1)


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    pids.append(int(entry.name))
    return pids


def rss_and_threads(pid: int) -> tuple[float, int]:
    """RSS in MB and threads, summed over ``pid`` and its children."""
    rss_kb = threads = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
    return rss_kb / 1024, threads


def post(port: int, body: dict, source: str = "127.0.0.1", timeout: float = 120):
    """One request on a new connection from ``source``: (status, headers, secs)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0)
    )
    started = time.monotonic()
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.getheaders()), time.monotonic() - started
    except (OSError, http.client.HTTPException):
        return 0, {}, time.monotonic() - started
    finally:
        conn.close()


# -- hold: thousands of cheap waiting connections -------------------------------


async def _hold(port: int, count: int, duration: float) -> dict:
    """Open ``count`` streams (8 client addresses) and read them for ``duration``."""
    body = json.dumps({**CHAT, "stream": True}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    seen: dict[int, set[str]] = {}
    end = time.monotonic() + duration

    async def one(index: int) -> None:
        kinds = seen.setdefault(index, set())
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(f"127.0.0.{2 + index % 8}", 0)
            )
        except OSError:
            kinds.add("connect_failed")
            return
        writer.write(request)
        try:
            while time.monotonic() < end:
                try:
                    data = await asyncio.wait_for(
                        reader.read(65536), end - time.monotonic()
                    )
                except TimeoutError:
                    break
                if not data:
                    kinds.add("closed")
                    break
                if b": queued" in data:
                    kinds.add("queued")
                if b"data: {" in data:
                    kinds.add("streaming")
                if b" 503 " in data[:20] or b'"error"' in data:
                    kinds.add("error")
        except OSError:
            kinds.add("closed")
        finally:
            writer.close()

    tasks = []
    for index in range(count):
        tasks.append(asyncio.ensure_future(one(index)))
        if index % 100 == 99:
            await asyncio.sleep(0.05)  # keep within the listen backlog
    await asyncio.gather(*tasks)
    final = {"streaming": 0, "queued_only": 0, "failed": 0}
    for kinds in seen.values():
        if kinds & {"connect_failed", "closed", "error"}:
            final["failed"] += 1
        elif "streaming" in kinds:
            final["streaming"] += 1
        elif "queued" in kinds:
            final["queued_only"] += 1
        else:
            final["failed"] += 1
    return final


def scenario_hold(procs: Processes, args: argparse.Namespace) -> dict:
    total = args.streams + args.queued
    chunks = int((args.warmup + args.duration + 30) / args.chunk_interval)
    upstream = StreamServer(procs, "slow-host", chunks, args.chunk_interval).start()
    settings = {
        "LM_STUDIO_URL": upstream.url,
        "UPSTREAM_SLOTS": args.streams,
        "QUEUE_TIMEOUT": args.warmup + args.duration + 60,
        "STREAM_IDLE_TIMEOUT": 120,
    }
    gateway, port = start_gateway(procs, "gateway-hold", settings)
    idle_rss, idle_threads = rss_and_threads(gateway.pid)
    client = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.admission", "hold-client", str(port)),
            *(str(total), str(args.warmup + args.duration)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(args.warmup)
    prober = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.prober", "127.0.0.1", str(port)),
            *("/health/live", "--every", "0.1", "--for", str(args.duration - 1)),
            *("--timeout", "5"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    samples = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append(rss_and_threads(gateway.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    probes = [line.split() for line in prober.communicate()[0].splitlines()]
    held = json.loads(client.communicate()[0])
    stop.set()
    sampler.join()
    procs.stop(gateway)
    answered = [float(ms) for status, ms in probes if status == "200"]
    return {
        "connections": total,
        "streaming": held["streaming"],
        "queued (comments only)": held["queued_only"],
        "failed": held["failed"],
        "live p50 ms": percentile(answered, 0.5),
        "live p95 ms": percentile(answered, 0.95),
        "live max ms": max(answered, default=None),
        "probe failures": len(probes) - len(answered),
        "RSS idle MB": idle_rss,
        "RSS max MB": max((s[0] for s in samples), default=None),
        "threads max": max((s[1] for s in samples), default=idle_threads),
    }


# -- fairness ---------------------------------------------------------------------


def fairness_run(port: int, service: float, flood: int, single_for: float) -> dict:
    """A floods; B sends one per second; then 4 equal clients."""
    b_waits: list[float] = []
    a_results = []

    def flood_a() -> None:
        with ThreadPoolExecutor(flood) as pool:
            a_results.extend(
                pool.map(lambda _: post(port, CHAT, "127.0.0.2"), range(flood))
            )

    flooder = threading.Thread(target=flood_a)
    flooder.start()
    time.sleep(0.5)
    b_threads = []
    next_at = time.monotonic()
    stop_at = time.monotonic() + single_for

    def one_b() -> None:
        status, headers, _ = post(port, CHAT, "127.0.0.3")
        if status == 200:
            b_waits.append(float(headers.get("X-Queue-Time", "nan")))

    while time.monotonic() < stop_at:
        thread = threading.Thread(target=one_b)
        thread.start()
        b_threads.append(thread)
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
    for thread in b_threads:
        thread.join()
    flooder.join()

    # Equal weights, equal demand: 4 clients x 50 at once.
    finished: list[tuple[float, str]] = []
    lock = threading.Lock()

    def one(source: str) -> None:
        post(port, CHAT, source)
        with lock:
            finished.append((time.monotonic(), source))

    sources = [f"127.0.0.{10 + i}" for i in range(4)]
    with ThreadPoolExecutor(200) as pool:
        list(pool.map(one, [s for s in sources for _ in range(50)]))
    finished.sort()
    window = [source for _, source in finished[: len(finished) // 2]]
    counts = [window.count(s) for s in sources]
    return {
        "service s": service,
        "A ok": sum(1 for status, _, _ in a_results if status == 200),
        "B requests": len(b_waits),
        "B wait p50 s": percentile(b_waits, 0.5),
        "B wait p95 s": percentile(b_waits, 0.95),
        "B wait max s": max(b_waits, default=None),
        "B p95 / service": (percentile(b_waits, 0.95) or 0) / service,
        "Jain (4 equal clients)": jain(counts),
        "served per client (first half)": "/".join(map(str, counts)),
    }


def scenario_fairness(procs: Processes, args: argparse.Namespace, workers: int):
    fake = start_fake(procs, f"fake-fair-{workers}", args.service)
    settings: dict[str, object] = {
        "LM_STUDIO_URL": fake,
        "UPSTREAM_SLOTS": 2,
        "QUEUE_TIMEOUT": 300,
    }
    with contextlib.ExitStack() as stack:
        if workers > 1:
            settings["RATE_LIMIT_STORAGE_URI"] = stack.enter_context(
                redis_server(procs)
            )
        gateway, port = start_gateway(
            procs, f"gateway-fair-{workers}", settings, workers=workers
        )
        # One service time, measured uncontended.
        service = statistics.median(post(port, CHAT)[2] for _ in range(5))
        result = fairness_run(port, service, 200, args.single_for)
        procs.stop(gateway)
    result["workers"] = f"{workers}" + (" (Redis)" if workers > 1 else "")
    return result


# -- overhead ---------------------------------------------------------------------


def sequential_p50(port: int, count: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps(CHAT)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        times.append(time.perf_counter() - started)
        if response.status != 200:
            raise SystemExit(f"overhead: status {response.status}")
    conn.close()
    return statistics.median(times) * 1000


def admission_cost_us(rounds: int = 20000) -> float:
    sys.path.insert(0, str(ROOT))
    from llm_service.upstreams.admission import Admission

    admission = Admission()
    admission.configure("host", 4)
    times = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        admission.enter("host", "addr:127.0.0.1").release()
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000


def scenario_overhead(procs: Processes, args: argparse.Namespace) -> dict:
    upstream = StreamServer(procs, "fast-host", 1, 0.0).start()
    settings = {"LM_STUDIO_URL": upstream.url}
    before_root = Path(args.before)
    has_before = (before_root / "gunicorn.conf.py").exists() and not (
        before_root / "llm_service" / "upstreams" / "admission.py"
    ).exists()
    _, after_port = start_gateway(procs, "gateway-after", settings)
    ports = {"after": after_port}
    if has_before:
        _, ports["before"] = start_gateway(
            procs, "gateway-before", settings, cwd=before_root
        )
    results: dict[str, list[float]] = {name: [] for name in ports}
    for port in ports.values():
        sequential_p50(port, 200)  # warm up
    for _ in range(args.rounds):
        for name, port in ports.items():
            results[name].append(sequential_p50(port, args.requests))
    row = {
        "requests per round": args.requests,
        "rounds": args.rounds,
        "after p50 ms": statistics.median(results["after"]),
        "enter+release in-process p50 us": admission_cost_us(),
    }
    if has_before:
        row["before p50 ms"] = statistics.median(results["before"])
        row["added p50 ms"] = row["after p50 ms"] - row["before p50 ms"]
    return row


# -- slots ------------------------------------------------------------------------


def scenario_slots(procs: Processes, args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from tests.fakes.lmstudio import FakeLMStudio

    rows = []
    with (
        redis_server(procs) as redis_url,
        FakeLMStudio(
            models=["bench-model"], first_token_delay=0.02, max_connections=1024
        ) as fake,
    ):
        for workers in (1, 2):
            fake.peak_generations = 0
            settings = {
                "LM_STUDIO_URL": fake.url,
                "UPSTREAM_SLOTS": 2,
                "RATE_LIMIT_STORAGE_URI": redis_url,
            }
            gateway, port = start_gateway(
                procs, f"gateway-slots-{workers}", settings, workers=workers
            )
            started = time.monotonic()
            with ThreadPoolExecutor(200) as pool:
                statuses = [r[0] for r in pool.map(post, [port] * 200, [CHAT] * 200)]
            rows.append(
                {
                    "workers (Redis)": workers,
                    "requests": len(statuses),
                    "ok": statuses.count(200),
                    "peak at the host": fake.peak_generations,
                    "seconds": time.monotonic() - started,
                }
            )
            procs.stop(gateway)
    return rows


# -- report -----------------------------------------------------------------------


def shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    keys = list(dict.fromkeys(key for row in rows for key in row))
    if len(rows) == 1:
        print("| figure | value |\n|---|---|")
        for key in keys:
            print(f"| {key} | {shown(rows[0].get(key))} |")
        return
    print("| figure | " + " | ".join(f"run {i + 1}" for i in range(len(rows))) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        print(f"| {key} | " + " | ".join(shown(r.get(key)) for r in rows) + " |")


def main() -> None:
    if sys.argv[1:2] == ["hold-client"]:
        port, count, duration = sys.argv[2:5]
        raise_fd_limit(int(count) + 256)
        print(json.dumps(asyncio.run(_hold(int(port), int(count), float(duration)))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default="hold,fairness,overhead,slots")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--chunk-interval", type=float, default=1.0)
    parser.add_argument("--for", dest="duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--service", type=float, default=0.2)
    parser.add_argument("--single-for", type=float, default=15.0)
    parser.add_argument("--before", default="/work/main")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    only = set(args.only.split(","))
    raise_fd_limit(4 * (args.streams + args.queued) + 1024)
    with (
        tempfile.TemporaryDirectory(prefix="bench-admission-") as workdir,
        Processes(Path(workdir)) as procs,
    ):
        if "slots" in only:
            table(
                "slots: 200 concurrent requests, fake host with 2 slots",
                scenario_slots(procs, args),
            )
        if "overhead" in only:
            table(
                "overhead: sequential uncontended requests, p50 of rounds",
                [scenario_overhead(procs, args)],
            )
        if "fairness" in only:
            table(
                f"fairness: 2 slots, {args.service:g} s per answer; A floods 200, "
                "B one per second; then 4 clients x 50",
                [scenario_fairness(procs, args, w) for w in (1, 2)],
            )
        if "hold" in only:
            table(
                f"hold: {args.streams} streams (1 chunk / {args.chunk_interval:g} s)"
                f" + {args.queued} queued, {args.duration:g} s after "
                f"{args.warmup:g} s",
                [scenario_hold(procs, args)],
            )
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
