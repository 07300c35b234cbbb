"""Slowloris against the shipped gunicorn.conf.py: ``python -m bench.slowloris``.

An attacker process keeps ``--sockets`` connections (2,000 by default) open to
the gateway, each sending one byte of a request head every ``--interval``
seconds and never finishing it, and opens a new one whenever the gateway
closes one. Meanwhile a prober (``bench.prober``, a process of its own) asks
``/health/live`` on a new connection every 100 ms, and a normal ``/llm/message``
is sent every 2 s, against the fake LM Studio of the tests.

Measured twice, same settings otherwise: **before**, gunicorn's own ``gthread``
worker with the old ``worker_connections`` (2 x threads); **after**, the
shipped worker (``llm_service.server.Worker``). Printed: liveness p50/p95/max
and failures, ``/llm/message`` successes, how long the gateway took to close a
trickling socket (median, p95, max; target: ``CLIENT_HEADER_TIMEOUT`` + 2 s),
and how many sockets the attacker held.

    python -m bench.slowloris [--sockets 2000] [--interval 2] [--for 30]
        [--only before|after]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from bench.procs import raise_fd_limit

ROOT = Path(__file__).resolve().parents[1]
HEAD_START = b"GET /health/live HTTP/1.1\r\nHost: gateway\r\nX-Slow: "
VARIANTS = {
    # gunicorn's gthread worker as the gateway shipped it before.
    "before": {"worker_class": "gthread", "worker_connections": 2048},
    "after": {},
}


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# -- The attacker (a process of its own) --------------------------------------


def attack(port: int, sockets: int, interval: float, duration: float) -> dict:
    """Hold ``sockets`` trickling connections for ``duration`` s; reconnect."""
    raise_fd_limit(sockets * 2 + 256)
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    closed_after: list[float] = []
    refused = 0
    held_max = 0

    def connect() -> None:
        nonlocal refused
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            refused += 1
            sock.close()
            return
        opened[sock] = time.monotonic()
        selector.register(sock, selectors.EVENT_READ)

    def closed(sock: socket.socket) -> bool:
        try:
            return sock.recv(4096) == b""
        except BlockingIOError:
            return False
        except OSError as err:
            return err.errno != errno.ENOTCONN

    end = time.monotonic() + duration
    next_byte = time.monotonic()
    sent: dict[socket.socket, int] = {}
    while time.monotonic() < end:
        for _ in range(min(200, sockets - len(opened))):  # ramp up, then refill
            connect()
        held_max = max(held_max, len(opened))
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            if closed(sock):
                closed_after.append(time.monotonic() - opened.pop(sock))
                sent.pop(sock, None)
                selector.unregister(sock)
                sock.close()
        if time.monotonic() >= next_byte:
            next_byte += interval
            for sock in list(opened):
                index = sent.get(sock, 0)
                data = HEAD_START[index : index + 1] or b"a"
                try:
                    if sock.send(data):
                        sent[sock] = index + 1
                except (BlockingIOError, InterruptedError):
                    pass  # still connecting, or its buffer is full
                except OSError:
                    pass  # closed: the selector reports it
    still_open = [time.monotonic() - started for started in opened.values()]
    for sock in opened:
        sock.close()
    return {
        "closed_after": closed_after,
        "still_open_ages": still_open,
        "refused": refused,
        "held_max": held_max,
    }


# -- One measured run ----------------------------------------------------------


def run_variant(name: str, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.fakes.lmstudio import FakeLMStudio
    from tests.servers import GatewayServer

    settings = {"LOG_LEVEL": "WARNING"}
    gunicorn = dict(VARIANTS[name])
    with FakeLMStudio() as fake:
        settings["LM_STUDIO_URL"] = fake.url
        gateway = GatewayServer(settings, **gunicorn)
        if not gunicorn:  # the shipped settings, whatever this shell says
            gateway.env.pop("GUNICORN_WORKER_CLASS", None)
            gateway.env.pop("GUNICORN_WORKER_CONNECTIONS", None)
        with gateway:
            attack_for = args.warmup + args.duration
            attacker = subprocess.Popen(
                [
                    *(sys.executable, "-m", "bench.slowloris", "attack"),
                    *(str(gateway.port), str(args.sockets), str(args.interval)),
                    str(attack_for),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(args.warmup)  # the attacker holds its sockets
            prober = subprocess.Popen(
                [
                    *(sys.executable, "-m", "bench.prober", "127.0.0.1"),
                    *(str(gateway.port), "/health/live", "--every", "0.1"),
                    *("--for", str(args.duration - 1), "--timeout", "5"),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            messages: list[tuple[int, float]] = []

            def send_messages() -> None:
                stop = time.monotonic() + args.duration - 2
                while time.monotonic() < stop:
                    started = time.monotonic()
                    try:
                        status = requests.post(
                            f"{gateway.url}/llm/message",
                            json={"messages": [{"role": "user", "content": "hi"}]},
                            timeout=10,
                        ).status_code
                    except requests.RequestException:
                        status = 0
                    messages.append((status, time.monotonic() - started))
                    time.sleep(max(0.0, 2 - (time.monotonic() - started)))

            sender = threading.Thread(target=send_messages)
            sender.start()
            probes = [line.split() for line in prober.communicate()[0].splitlines()]
            sender.join()
            attacked = json.loads(attacker.communicate()[0])
    answered = [float(ms) for status, ms in probes if status == "200"]
    return {
        "variant": name,
        "probes": len(probes),
        "probe_failures": len(probes) - len(answered),
        "live_p50_ms": percentile(answered, 0.5),
        "live_p95_ms": percentile(answered, 0.95),
        "live_max_ms": max(answered, default=None),
        "messages_ok": sum(status == 200 for status, _ in messages),
        "messages": len(messages),
        "message_p50_s": percentile([s for _, s in messages], 0.5),
        "closed": len(attacked["closed_after"]),
        "close_p50_s": percentile(attacked["closed_after"], 0.5),
        "close_p95_s": percentile(attacked["closed_after"], 0.95),
        "close_max_s": max(attacked["closed_after"], default=None),
        # Still open when the attack ended, and the oldest of them: under a
        # deadline none is older than it.
        "open_at_end": len(attacked["still_open_ages"]),
        "open_at_end_oldest_s": max(attacked["still_open_ages"], default=None),
        "held_max": attacked["held_max"],
        "connect_failures": attacked["refused"],
    }


def shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def main() -> None:
    if sys.argv[1:2] == ["attack"]:
        port, sockets, interval, duration = sys.argv[2:6]
        result = attack(int(port), int(sockets), float(interval), float(duration))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--for", dest="duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--only", choices=sorted(VARIANTS))
    args = parser.parse_args()
    raise_fd_limit(args.sockets * 2 + 256)
    rows = [run_variant(name, args) for name in VARIANTS if args.only in (None, name)]
    keys = [key for key in rows[0] if key != "variant"]
    print(
        f"\nslowloris: {args.sockets} trickling sockets (1 byte / {args.interval:g} s, "
        f"reconnecting), {args.duration:g} s measured after {args.warmup:g} s; "
        "CLIENT_HEADER_TIMEOUT default (10 s)\n"
    )
    print("| figure | " + " | ".join(row["variant"] for row in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        print(f"| {key} | " + " | ".join(shown(row[key]) for row in rows) + " |")
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
