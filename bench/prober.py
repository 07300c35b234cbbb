"""Liveness prober: ``python -m bench.prober HOST PORT PATH --every S --for S``.

Sends ``GET PATH`` on a new connection every ``--every`` seconds for at most
``--for`` seconds (or until SIGTERM) and prints one line per probe:
``<status or 0> <milliseconds>``. A process of its own, so the time it
measures is the server's, not the load generator's busy event loop.
"""

from __future__ import annotations

import argparse
import http.client
import signal
import sys
import time


def main() -> None:
    """Probe until told to stop; one output line per probe."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("--every", type=float, default=0.25)
    parser.add_argument("--for", dest="duration", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    deadline = time.monotonic() + args.duration
    while not stop and time.monotonic() < deadline:
        started = time.perf_counter()
        conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        try:
            conn.request("GET", args.path)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            conn.close()
        elapsed = (time.perf_counter() - started) * 1000
        sys.stdout.write(f"{status} {elapsed:.3f}\n")
        sys.stdout.flush()
        time.sleep(max(0.0, args.every - elapsed / 1000))


if __name__ == "__main__":
    main()
