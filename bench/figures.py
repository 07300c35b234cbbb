"""The figures: each runs its load against the targets and returns plain data.

Every figure that can be repeated runs ``settings.runs`` times and keeps each
run's value; :func:`spread` turns those into median, min and max. "Added"
figures subtract the direct call's value measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .contenders import Target
from .load import run_wrk, sequential
from .report import fmt
from .upstreams import ROOT, StreamServer
from .wire import SSEStream

MS = 1e6  # nanoseconds per millisecond
#: Share of liveness probes that may exceed the limit in a held level.
HEALTH_SLACK = 0.05
#: How fast the capacity figure opens its streams.
RAMP_PER_SECOND = 500
MIB = 1024 * 1024


@dataclass
class Settings:
    """Every knob of a run; smoke and full differ only here."""

    mode: str
    runs: int
    seq_requests: int
    seq_warmup: int
    wrk_seconds: float
    wrk_warmup_seconds: float
    concurrencies: tuple[int, ...]
    stream_chunks: int
    stream_interval: float
    streams_per_run: int
    capacity_levels: tuple[int, ...]
    slow_chunks: int
    slow_interval: float
    health_limit_ms: float
    memory_requests: int
    memory_connections: int
    cancel_trials: int
    cancel_after_chunks: int
    profile_seconds: float
    litellm: bool


FULL = Settings(
    mode="full",
    runs=3,
    seq_requests=1000,
    seq_warmup=100,
    wrk_seconds=5,
    wrk_warmup_seconds=1,
    concurrencies=(16, 64),
    stream_chunks=20,
    stream_interval=0.05,
    streams_per_run=6,
    capacity_levels=(100, 200, 500, 1000),
    slow_chunks=8,
    slow_interval=1.0,
    health_limit_ms=100.0,
    memory_requests=50_000,
    memory_connections=16,
    cancel_trials=5,
    cancel_after_chunks=3,
    profile_seconds=10,
    litellm=True,
)
SMOKE = Settings(
    mode="smoke",
    runs=1,
    seq_requests=200,
    seq_warmup=20,
    wrk_seconds=1,
    wrk_warmup_seconds=1,
    concurrencies=(16, 64),
    stream_chunks=20,
    stream_interval=0.05,
    streams_per_run=2,
    capacity_levels=(100,),
    slow_chunks=6,
    slow_interval=0.5,
    health_limit_ms=100.0,
    memory_requests=2_000,
    memory_connections=16,
    cancel_trials=2,
    cancel_after_chunks=3,
    profile_seconds=3,
    litellm=False,
)


# -- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the ``q``-th percentile (0-100), linear between ranks; None if empty.

    ``statistics.quantiles``' inclusive method: the data are the population.
    """
    if not values:
        return None
    if len(values) == 1 or q <= 0:
        return min(values)
    if q >= 100:
        return max(values)
    if q != int(q):
        raise ValueError(f"percentile {q} is not a whole number")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def spread(values: Sequence[float | None]) -> dict | None:
    """Return median, min and max of the runs' values (None when none ran)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    return {
        "median": statistics.median(kept),
        "min": min(kept),
        "max": max(kept),
        "runs": len(kept),
    }


def _na(target: Target) -> dict:
    return {"label": target.label, "available": False, "reason": target.reason}


# -- sequential latency ----------------------------------------------------------


def latency(
    settings: Settings,
    direct: Target,
    targets: Sequence[Target],
    once: Sequence[Target] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """One request at a time: p50/p99 per target and added over direct.

    ``once`` targets (the gateway with INFO access logs) run in the first run only.
    """
    per_run: dict[str, list[dict]] = {}
    live = [t for t in [*targets, *once] if t.available]
    for run in range(settings.runs):
        chosen = [direct, *(t for t in targets if t.available)]
        if run == 0:
            chosen += [t for t in once if t.available]
        log(f"   latency run {run + 1}/{settings.runs}: {len(chosen)} targets")
        results = sequential(chosen, settings.seq_requests, settings.seq_warmup)
        base = results[direct.key]["ns"]
        base50, base99 = percentile(base, 50), percentile(base, 99)
        for target in chosen:
            samples = results[target.key]["ns"]
            p50, p99 = percentile(samples, 50), percentile(samples, 99)
            per_run.setdefault(target.key, []).append(
                {
                    "p50": p50 / MS if p50 is not None else None,
                    "p99": p99 / MS if p99 is not None else None,
                    "added_p50": (p50 - base50) / MS if p50 and base50 else None,
                    "added_p99": (p99 - base99) / MS if p99 and base99 else None,
                    "errors": results[target.key]["errors"],
                }
            )
    out: dict = {
        "requests_per_run": settings.seq_requests,
        "runs": settings.runs,
        "targets": {},
    }
    for target in [direct, *targets, *once]:
        if target is not direct and target not in live:
            out["targets"][target.key] = _na(target)
            continue
        runs = per_run.get(target.key, [])
        out["targets"][target.key] = {
            "label": target.label,
            "available": True,
            "p50_ms": spread([r["p50"] for r in runs]),
            "p99_ms": spread([r["p99"] for r in runs]),
            "added_p50_ms": spread([r["added_p50"] for r in runs]),
            "added_p99_ms": spread([r["added_p99"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
        }
    return out


# -- throughput ----------------------------------------------------------------


def throughput(
    settings: Settings,
    targets: Sequence[Target],
    once: Sequence[Target] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Requests/s at each concurrency with wrk; errors counted, runs interleaved."""
    per_run: dict[tuple[str, int], list[dict]] = {}
    for run in range(settings.runs):
        chosen = [t for t in targets if t.available]
        if run == 0:
            chosen += [t for t in once if t.available]
        for target in chosen:
            # Warm up: connection pools, thread pools, lazy imports.
            run_wrk(target, settings.concurrencies[0], settings.wrk_warmup_seconds)
            for connections in settings.concurrencies:
                cpu_before = target.service.cpu_seconds()
                result = run_wrk(target, connections, settings.wrk_seconds)
                cpu_after = target.service.cpu_seconds()
                # CPU per request barely moves with other load on the machine,
                # unlike requests/s: it explains the throughput ratios.
                result["cpu_ms_per_request"] = (
                    (cpu_after - cpu_before) * 1000 / result["requests"]
                    if cpu_before is not None and result["requests"]
                    else None
                )
                log(
                    f"   throughput run {run + 1}/{settings.runs} {target.label} "
                    f"c={connections}: {result['rps']:.0f} req/s, "
                    f"{result['non_2xx']} non-2xx, {result['socket_errors']} "
                    "socket errors"
                )
                per_run.setdefault((target.key, connections), []).append(result)
    out: dict = {
        "seconds_per_run": settings.wrk_seconds,
        "runs": settings.runs,
        "concurrencies": list(settings.concurrencies),
        "targets": {},
    }
    for target in [*targets, *once]:
        if not target.available:
            out["targets"][target.key] = _na(target)
            continue
        entry: dict = {"label": target.label, "available": True, "by_concurrency": {}}
        for connections in settings.concurrencies:
            runs = per_run.get((target.key, connections), [])
            entry["by_concurrency"][str(connections)] = {
                "rps": spread([r["rps"] for r in runs]),
                "non_2xx": sum(r["non_2xx"] for r in runs),
                "socket_errors": sum(r["socket_errors"] for r in runs),
                "requests": sum(r["requests"] for r in runs),
                "latency_p50_ms": spread([r["latency_p50_ms"] for r in runs]),
                "latency_p99_ms": spread([r["latency_p99_ms"] for r in runs]),
                "cpu_ms_per_request": spread([r["cpu_ms_per_request"] for r in runs]),
            }
        out["targets"][target.key] = entry
    return out


def ratios(
    result: dict, numerators: Sequence[str], denominator: str
) -> dict[str, dict[str, float | None]]:
    """Return median-rps ratios ``numerator / denominator`` per concurrency."""
    out: dict[str, dict[str, float | None]] = {}
    targets = result["targets"]
    bottom = targets.get(denominator, {})
    for key in numerators:
        top = targets.get(key, {})
        out[key] = {}
        for connections in result["concurrencies"]:
            c = str(connections)
            try:
                a = top["by_concurrency"][c]["rps"]["median"]
                b = bottom["by_concurrency"][c]["rps"]["median"]
            except (KeyError, TypeError):
                out[key][c] = None
                continue
            out[key][c] = a / b if b else None
    return out


# -- streaming -----------------------------------------------------------------


def _stream_stats(results: Sequence, expected: int) -> dict:
    """Summarize streams: time to first chunk, per-chunk delay, held chunks."""
    ttfc, delays = [], []
    held = merged = missing = errors = 0
    for result in results:
        if result.error or result.status != 200:
            errors += 1
            continue
        tokens = result.tokens
        if not tokens:
            errors += 1
            continue
        ttfc.append((tokens[0][3] - result.started_ns) / MS)
        missing += max(0, expected - len(tokens))
        merged += sum(1 for fresh in result.new_tokens() if len(fresh) > 1)
        for i, (_, _, sent, arrived) in enumerate(tokens):
            delays.append((arrived - sent) / MS)
            # Held back: it reached the client only after the upstream had
            # already sent the next chunk, i.e. it waited for company.
            if i + 1 < len(tokens) and arrived > tokens[i + 1][2]:
                held += 1
    return {
        "ttfc_ms_p50": percentile(ttfc, 50),
        "delay_ms_p50": percentile(delays, 50),
        "delay_ms_p99": percentile(delays, 99),
        "delay_ms_max": max(delays) if delays else None,
        "chunks": len(delays),
        "held_chunks": held,
        "merged_events": merged,
        "missing_chunks": missing,
        "errors": errors,
    }


async def _one_stream(target: Target, timeout: float):
    stream = SSEStream(
        target.host, target.port, target.path, target.body, target.headers
    )
    try:
        async with asyncio.timeout(timeout):
            return await stream.run()
    except TimeoutError:
        stream.close()
        stream.result.error = f"timed out after {timeout:g} s"
        return stream.result


def streaming(
    settings: Settings,
    direct: Target,
    targets: Sequence[Target],
    log: Callable[[str], None] = print,
) -> dict:
    """Stream one answer at a time; compare chunk timing with the direct call."""
    duration = settings.stream_chunks * settings.stream_interval
    per_run: dict[str, list[dict]] = {}
    chosen = [direct, *(t for t in targets if t.available)]
    for run in range(settings.runs):
        results: dict[str, list] = {t.key: [] for t in chosen}
        for _ in range(settings.streams_per_run):
            for target in chosen:
                results[target.key].append(
                    asyncio.run(_one_stream(target, duration + 15))
                )
        stats = {
            key: _stream_stats(value, settings.stream_chunks)
            for key, value in results.items()
        }
        base = stats[direct.key]
        for key, value in stats.items():
            for name in ("ttfc_ms_p50", "delay_ms_p50", "delay_ms_p99"):
                mine, theirs = value[name], base[name]
                value[f"added_{name}"] = (
                    mine - theirs if mine is not None and theirs is not None else None
                )
            per_run.setdefault(key, []).append(value)
        log(
            f"   streaming run {run + 1}/{settings.runs}: "
            + ", ".join(
                f"{t.label} delay p99 {fmt(stats[t.key]['delay_ms_p99'])} ms"
                for t in chosen
            )
        )
    out: dict = {
        "chunks": settings.stream_chunks,
        "interval_ms": settings.stream_interval * 1000,
        "streams_per_run": settings.streams_per_run,
        "runs": settings.runs,
        "targets": {},
    }
    for target in [direct, *targets]:
        if target not in chosen:
            out["targets"][target.key] = _na(target)
            continue
        runs = per_run[target.key]
        entry: dict = {"label": target.label, "available": True}
        for name in (
            "ttfc_ms_p50",
            "delay_ms_p50",
            "delay_ms_p99",
            "added_ttfc_ms_p50",
            "added_delay_ms_p50",
            "added_delay_ms_p99",
        ):
            entry[name] = spread([r[name] for r in runs])
        for name in ("held_chunks", "merged_events", "missing_chunks", "errors"):
            entry[name] = sum(r[name] for r in runs)
        entry["chunks"] = sum(r["chunks"] for r in runs)
        entry["delay_ms_max"] = max(
            (r["delay_ms_max"] for r in runs if r["delay_ms_max"] is not None),
            default=None,
        )
        entry["batched"] = bool(entry["merged_events"] or entry["held_chunks"])
        out["targets"][target.key] = entry
    return out


# -- slow-stream capacity ----------------------------------------------------------


async def _hold_level(
    target: Target,
    level: int,
    settings: Settings,
    health_path: str,
) -> dict:
    """Open ``level`` slow streams and watch the target while they run.

    Streams open at ``RAMP_PER_SECOND`` (a thousand within two seconds, not a
    single burst), and a separate prober process times the liveness route
    throughout, so the figure is the server's latency, not this event loop's.
    """
    stream_seconds = settings.slow_chunks * settings.slow_interval
    # Every stream must have its first chunk by then: later means it waited
    # for another stream to end (a free thread), so it was not held at once.
    first_chunk_deadline = first_chunk_limit(settings)
    rss_peak = threads_peak = 0
    stop = asyncio.Event()
    prober = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.prober",
        target.host,
        str(target.port),
        health_path,
        "--for",
        str(stream_seconds + level / RAMP_PER_SECOND + 30),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )

    async def watch_memory() -> None:
        nonlocal rss_peak, threads_peak
        while not stop.is_set():
            tree = target.service.rss()
            if tree:
                rss_peak = max(rss_peak, tree["total"])
                threads_peak = max(threads_peak, tree["threads"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    async def open_later(index: int):
        await asyncio.sleep(index / RAMP_PER_SECOND)
        return await _one_stream(target, stream_seconds + 20)

    watcher = asyncio.create_task(watch_memory())
    cpu_before, wall_before = target.service.cpu_seconds(), time.monotonic()
    try:
        results = await asyncio.gather(*(open_later(i) for i in range(level)))
    finally:
        stop.set()
        await watcher
        with contextlib.suppress(ProcessLookupError):
            prober.terminate()
        output, _ = await prober.communicate()
    cpu_after, wall = target.service.cpu_seconds(), time.monotonic() - wall_before
    health = [
        (int(status), float(ms))
        for status, ms in (line.split() for line in output.decode().splitlines())
    ]
    waits = [
        (r.first_token_ns - r.started_ns) / 1e9 for r in results if r.first_token_ns
    ]
    failed = [
        r
        for r in results
        if r.error
        or r.status != 200
        or len(r.tokens) < settings.slow_chunks
        or not r.first_token_ns
        or (r.first_token_ns - r.started_ns) / 1e9 > first_chunk_deadline
    ]
    errors = [
        r.error or f"HTTP {r.status}" for r in results if r.error or r.status != 200
    ]
    health_ms = [ms for status, ms in health if status == 200]
    health_bad = sum(
        1 for status, ms in health if status != 200 or ms > settings.health_limit_ms
    )
    # One probe in twenty may be late: on a shared 2-core machine a single
    # scheduling hiccup says nothing about the server (the max is reported).
    health_ok = bool(health) and health_bad <= len(health) * HEALTH_SLACK
    return {
        "level": level,
        "held": not failed and health_ok,
        "streams_ok": level - len(failed),
        "peak_concurrent": _peak_concurrent(results),
        "stream_errors": len(errors),
        "error_sample": errors[:3],
        "first_chunk_wait_s_p50": percentile(waits, 50),
        "first_chunk_wait_s_max": max(waits) if waits else None,
        "health_probes": len(health),
        "health_over_limit_or_failed": health_bad,
        "health_ms_p50": percentile(health_ms, 50),
        "health_ms_p95": percentile(health_ms, 95),
        "health_ms_max": max(health_ms) if health_ms else None,
        "rss_total_mib": round(rss_peak / MIB, 1) if rss_peak else None,
        "threads_peak": threads_peak or None,
        # Cores the server kept busy while holding the level (1.0 = one core).
        "cpu_cores": (
            round((cpu_after - cpu_before) / wall, 3)
            if cpu_before is not None and cpu_after is not None
            else None
        ),
    }


def first_chunk_limit(settings: Settings) -> float:
    """Seconds a slow stream may wait for its first chunk and still count as held.

    Half a stream's length: a stream queued behind a busy one waits a whole
    stream, and a thousand connections open well within it.
    """
    return max(1.5, settings.slow_chunks * settings.slow_interval / 2)


def _peak_concurrent(results: Sequence) -> int:
    """Return the most streams that were delivering chunks at the same moment."""
    moments = []
    for result in results:
        tokens = result.tokens
        if tokens:
            moments += [(tokens[0][3], 1), (tokens[-1][3], -1)]
    peak = current = 0
    for _, step in sorted(moments):
        current += step
        peak = max(peak, current)
    return peak


def capacity(
    settings: Settings,
    targets: Sequence[tuple[Target, str]],
    log: Callable[[str], None] = print,
) -> dict:
    """Find the most slow streams each target holds, level by level.

    ``targets`` pairs each target with its liveness path. A
    level is held when every stream gets its first chunk promptly and all its
    chunks with no error, and every liveness probe answers 200 within the limit.
    Levels stop at the first one not held.
    """
    out: dict = {
        "levels": list(settings.capacity_levels),
        "chunks": settings.slow_chunks,
        "interval_s": settings.slow_interval,
        "first_chunk_limit_s": first_chunk_limit(settings),
        "health_limit_ms": settings.health_limit_ms,
        "targets": {},
    }
    for target, health_path in targets:
        if not target.available:
            out["targets"][target.key] = _na(target)
            continue
        levels = []
        for level in settings.capacity_levels:
            result = asyncio.run(_hold_level(target, level, settings, health_path))
            levels.append(result)
            log(
                f"   capacity {target.label} {level} streams: "
                f"{'held' if result['held'] else 'NOT held'} "
                f"({result['streams_ok']} ok, peak {result['peak_concurrent']} at "
                f"once, health max "
                f"{fmt(result['health_ms_max'])} ms, "
                f"RSS {result['rss_total_mib']} MiB)"
            )
            # Let the last level's sockets drain before the next one.
            time.sleep(1.0)
            if not result["held"]:
                break
        held = [r["level"] for r in levels if r["held"]]
        out["targets"][target.key] = {
            "label": target.label,
            "available": True,
            "max_held": max(held) if held else 0,
            "by_level": levels,
        }
    return out


# -- memory ----------------------------------------------------------------------


def memory(
    settings: Settings,
    targets: Sequence[Target],
    rss: Callable[[], dict | None],
    log: Callable[[str], None] = print,
) -> dict:
    """RSS per worker: cold, idle after a warm-up, and after the request count.

    ``targets`` are routes of one freshly started server; the load alternates
    between them in wrk slices sized to end near the count. Growth is measured
    from the warm idle state, so one-off warm-up costs (imports, thread and
    connection pools) do not count as a leak.
    """
    live = [t for t in targets if t.available]
    if not live:
        return {"label": "gateway", "available": False, "reason": targets[0].reason}
    label = "gateway (" + " + ".join(t.path for t in live) + ")"
    cold = rss()
    for target in live:  # warm-up, and a first measure of the rate
        rate = run_wrk(target, settings.memory_connections, 1)["rps"]
    time.sleep(1.0)
    idle = rss()
    served = errors = slices = 0
    deadline = time.monotonic() + max(60.0, settings.memory_requests / 100)
    while served < settings.memory_requests and time.monotonic() < deadline:
        target = live[slices % len(live)]
        left = settings.memory_requests - served
        # Slices of at most 10 s, so the routes share the load evenly.
        seconds = min(10.0, max(1.0, left / max(rate, 1.0) / len(live)))
        result = run_wrk(target, settings.memory_connections, seconds)
        rate = result["rps"] or rate
        served += result["requests"]
        errors += result["non_2xx"] + result["socket_errors"]
        slices += 1
    time.sleep(1.0)
    after = rss()
    idle_workers = sum(idle["workers"]) if idle else 0
    after_workers = sum(after["workers"]) if after else 0
    growth = (
        (after_workers - idle_workers) / idle_workers * 100 if idle_workers else None
    )
    log(
        f"   memory {label}: {served} requests, workers "
        f"{idle_workers / MIB:.1f} -> {after_workers / MIB:.1f} MiB "
        f"({fmt(growth)} %)"
    )
    return {
        "label": label,
        "available": True,
        "requests": served,
        "errors": errors,
        "cold_worker_mib": _mib(cold),
        "idle_worker_mib": _mib(idle),
        "after_worker_mib": _mib(after),
        "master_mib": (
            round(after["master"] / MIB, 1) if after and after["master"] else None
        ),
        "growth_pct": growth,
        # A worker whose thread pool grows holds more stacks: not a leak, but
        # it shows up as RSS growth.
        "threads_idle": idle["threads"] if idle else None,
        "threads_after": after["threads"] if after else None,
    }


def _mib(tree: dict | None) -> list[float] | None:
    return [round(w / MIB, 1) for w in tree["workers"]] if tree else None


# -- cancellation ------------------------------------------------------------------


async def _cancel_once(
    target: Target, after_chunks: int, upstream: StreamServer
) -> dict:
    stream = SSEStream(
        target.host, target.port, target.path, target.body, target.headers
    )
    try:
        async with asyncio.timeout(15):
            await stream.open()
            while len(stream.result.tokens) < after_chunks:
                if await stream.next_event() is None:
                    break
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as err:
        stream.close()
        return {"error": f"{type(err).__name__}: {err}"}
    stream.close()
    closed_at = stream.result.closed_ns
    stream_id = stream.result.stream_id
    if stream_id is None or closed_at is None:
        return {"error": "no chunk received before cancelling"}
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        record = upstream.records().get(stream_id)
        if record and record["closed_ns"] and not record["finished_ns"]:
            return {"gap_ms": (record["closed_ns"] - closed_at) / MS}
        if record and record["finished_ns"]:
            # The relay read the stream to its end: the upstream never knew.
            return {
                "gap_ms": None,
                "not_cancelled": True,
                "finished_after_ms": (record["finished_ns"] - closed_at) / MS,
            }
        await asyncio.sleep(0.02)
    return {"gap_ms": None, "not_cancelled": True, "finished_after_ms": None}


def cancellation(
    settings: Settings,
    direct: Target,
    targets: Sequence[Target],
    upstream: StreamServer,
    after_chunks: int,
    log: Callable[[str], None] = print,
) -> dict:
    """Client disconnects mid-stream: how long until the upstream connection closes.

    The client closes its socket after ``after_chunks`` chunks; a relay that
    only notices when it next hears from the upstream (or on a timer) shows
    it here, so the upstream's chunk interval is part of the result.
    """
    out: dict = {
        "trials": settings.cancel_trials,
        "after_chunks": after_chunks,
        "interval_ms": upstream.interval * 1000,
        "targets": {},
    }
    for target in [direct, *targets]:
        if not target.available:
            out["targets"][target.key] = _na(target)
            continue
        trials = [
            asyncio.run(_cancel_once(target, after_chunks, upstream))
            for _ in range(settings.cancel_trials)
        ]
        gaps = [t["gap_ms"] for t in trials if t.get("gap_ms") is not None]
        not_cancelled = sum(1 for t in trials if t.get("not_cancelled"))
        errors = [t["error"] for t in trials if "error" in t]
        out["targets"][target.key] = {
            "label": target.label,
            "available": True,
            "gap_ms_p50": percentile(gaps, 50),
            "gap_ms_max": max(gaps) if gaps else None,
            "cancelled": len(gaps),
            "not_cancelled": not_cancelled,
            "errors": len(errors),
            "error_sample": errors[:2],
        }
        log(
            f"   cancellation ({out['interval_ms']:g} ms chunks) {target.label}: "
            "gap p50 "
            f"{fmt(percentile(gaps, 50))} ms, {not_cancelled} not cancelled"
        )
    return out
