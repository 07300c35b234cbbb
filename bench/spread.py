"""Workers sharing a burst of keep-alive connections: ``python -m bench.spread``.

The gateway as deployed (``bench.run``'s ``Lab.deployed``: INFO logs, Redis,
a keyed caller, queue, metrics) with 1 and 2 workers, under wrk at 16 and 64
keep-alive connections (wrk opens them all at once, as a connection pool
does). Measured for this checkout and, with ``--before DIR``, for another
(e.g. ``/work/main``), in the same run, interleaved, median of ``--repeats``.
Printed per row: req/s, p50/p99 ms, and how wrk's connections were spread over
the workers (read from ``/proc`` during the run: a worker holds the sockets it
accepted), the median run's.

    python -m bench.spread [--before DIR] [--seconds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench import figures, sysinfo
from bench.load import run_wrk
from bench.procs import Processes
from bench.run import CHAT, Lab
from bench.upstreams import ROOT


def _inodes(port: int) -> set[str]:
    """Established TCP sockets on ``port`` (the server's side and the client's)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            found.add(fields[9])
    return found


def _held(pid: int, inodes: set[str]) -> int:
    count = 0
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            link = fd.readlink().name
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            count += 1
    return count


def spread_during(pid: int, port: int, after: float) -> tuple[threading.Thread, list]:
    """Count each worker's connections ``after`` seconds into the run."""
    out: list[int] = []

    def look() -> None:
        time.sleep(after)
        inodes = _inodes(port)
        out.extend(sorted(_held(w, inodes) for w in sysinfo.children(pid)))

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    return thread, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", type=Path, help="another checkout to compare")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    checkouts = {"after": ROOT}
    if args.before:
        checkouts = {"before": args.before, "after": ROOT}
    work = Path(tempfile.mkdtemp(prefix="spread-"))
    rows: dict[tuple, list[dict]] = {}
    with Processes(work) as procs:
        lab = Lab(procs, work, figures.FULL, ROOT, Path("/nonexistent"))
        targets = {}
        for tag, directory in checkouts.items():
            for workers in (1, 2):
                targets[(tag, workers)] = lab.target(
                    f"{tag}{workers}",
                    f"{tag} {workers}w",
                    lambda w=workers, d=directory, t=tag: lab.deployed(w, d, t),
                    CHAT,
                )
        for target in targets.values():
            run_wrk(target, 16, 1)  # warm up
        for _ in range(args.repeats):
            for connections in (16, 64):
                for (tag, workers), target in targets.items():
                    thread, spread = spread_during(
                        target.service.pid, target.port, args.seconds / 2
                    )
                    result = run_wrk(target, connections, args.seconds)
                    thread.join()
                    result["spread"] = spread
                    rows.setdefault((tag, workers, connections), []).append(result)
    print(f"median of {args.repeats} x {args.seconds:.0f} s, wrk keep-alive")
    header = ("checkout", "w", "c", "req/s", "p50", "p99")
    print("{:8} {:>2} {:>3} {:>7} {:>6} {:>7}  spread".format(*header))
    for (tag, workers, connections), results in rows.items():
        results.sort(key=lambda r: r["rps"])
        median = results[len(results) // 2]
        p50 = statistics.median(r["latency_p50_ms"] for r in results)
        p99 = statistics.median(r["latency_p99_ms"] for r in results)
        errors = sum(r["socket_errors"] + r["non_2xx"] for r in results)
        print(
            f"{tag:8} {workers:>2} {connections:>3} {median['rps']:>7.0f} "
            f"{p50:>6.1f} {p99:>7.1f}  {median['spread']}"
            + (f"  errors {errors}" if errors else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
