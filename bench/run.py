"""Benchmark entry point: ``python -m bench.run [--smoke] [--only FIGURE ...]``.

Starts the upstreams and contenders it needs, runs the chosen figures, writes
``<out>/<timestamp>.json`` and ``.md`` (and ``latest.*``), prints the summary,
and stops every process it started, whatever happens. Missed targets and
contenders that cannot run here are reported, not failures: the exit code is
non-zero only when the harness itself broke (1) or was interrupted (130).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from . import contenders, figures, profiling, report, sysinfo
from .contenders import Service, Target, Unavailable, chat_body
from .load import wrk_version
from .procs import ProcessError, Processes, raise_fd_limit
from .upstreams import MODEL, ROOT, STREAM_MODEL, Nginx, StreamServer, nginx_version

FIGURES = (
    "latency",
    "throughput",
    "streaming",
    "cancellation",
    "memory",
    "capacity",
    "profile",
)
SLOW_MODEL = "bench-slow"
CHAT = "/v1/chat/completions"
MESSAGE = "/llm/message"


#: The upstreams' slots for every gateway contender: nginx and the synthetic
#: stream servers run any number of requests at once, so the admission queue is
#: passed through (a slot taken and returned per call, a Redis lease as
#: deployed), never waited in: a wait would measure the queue's purpose (a
#: model server's few slots), not what it costs. The capacity figure holds up
#: to 1,000 streams at once.
BENCH_SLOTS = 4096


def log(message: str) -> None:
    """Print progress at once (CI has no TTY to flush lines for us)."""
    print(message, flush=True)


class Lab:
    """The run's servers, each started on first use and kept until the end."""

    def __init__(
        self,
        procs: Processes,
        workdir: Path,
        settings: figures.Settings,
        gateway_dir: Path,
        litellm_venv: Path,
    ) -> None:
        self.procs = procs
        self.workdir = workdir
        self.settings = settings
        self.gateway_dir = gateway_dir
        self.litellm_venv = litellm_venv
        self._services: dict[str, Service | BaseException] = {}
        self._targets: dict[str, Target] = {}
        self.upstreams: dict[str, Nginx | StreamServer] = {}
        self.litellm_version: str | None = None
        self.baseline_dir: Path | None = None
        self.baseline_tag = "baseline"

    # -- servers ---------------------------------------------------------------

    def _cached(self, name: str, start: Callable[[], Service]) -> Service:
        """Start a service once; a failed start is remembered and raised again."""
        if name not in self._services:
            log(f">> starting {name}")
            try:
                self._services[name] = start()
            except (ProcessError, Unavailable, OSError) as err:
                self._services[name] = err
        found = self._services[name]
        if isinstance(found, BaseException):
            raise found
        return found

    def upstream(self, name: str) -> Service:
        """Return an upstream service: ``nginx``, ``stream`` or ``slow``."""

        def start() -> Service:
            if name == "nginx":
                server: Nginx | StreamServer = Nginx(self.procs, self.workdir).start()
            elif name == "stream":
                server = StreamServer(
                    self.procs,
                    "stream-upstream",
                    self.settings.stream_chunks,
                    self.settings.stream_interval,
                ).start()
            else:
                server = StreamServer(
                    self.procs,
                    "slow-stream-upstream",
                    self.settings.slow_chunks,
                    self.settings.slow_interval,
                ).start()
            self.upstreams[name] = server
            return Service(name, server.port, server.child)

        return self._cached(f"upstream {name}", start)

    def gateway(self, upstream: str, log_level: str = "WARNING") -> Service:
        """Return the gateway in front of an upstream, at a log level."""
        name = f"gateway-{upstream}-{log_level.lower()}"
        url = f"http://127.0.0.1:{self.upstream(upstream).port}"
        return self._cached(
            name,
            lambda: contenders.start_gateway(
                self.procs,
                name,
                url,
                gateway_dir=self.gateway_dir,
                log_level=log_level,
                slots=BENCH_SLOTS,
            ),
        )

    def redis(self) -> Service:
        return self._cached("redis", lambda: contenders.start_redis(self.procs))

    def deployed(
        self, workers: int = 1, gateway_dir: Path | None = None, tag: str = ""
    ) -> Service:
        """The gateway as deployed: INFO access logs, metrics, queue, Redis, a key.

        The key has requests/tokens-per-minute and concurrency quotas (counted in
        Redis, never reached). The upstream gets ``BENCH_SLOTS`` slots: every
        call takes and returns a slot lease in Redis, and none waits.
        """
        name = f"gateway-deployed-{workers}w{tag}"
        url = f"http://127.0.0.1:{self.upstream('nginx').port}"
        return self._cached(
            name,
            lambda: contenders.start_gateway(
                self.procs,
                name,
                url,
                gateway_dir=gateway_dir or self.gateway_dir,
                log_level="INFO",
                redis_url=f"redis://127.0.0.1:{self.redis().port}/0",
                workers=workers,
                keyed=True,
                slots=BENCH_SLOTS,
            ),
        )

    def naive(self, workers: int = 1) -> Service:
        url = f"http://127.0.0.1:{self.upstream('nginx').port}"
        return self._cached(
            f"naive-proxy-{workers}w",
            lambda: contenders.start_naive_proxy(
                self.procs, url, gateway_dir=self.gateway_dir, workers=workers
            ),
        )

    def stop(self, name: str) -> None:
        """Stop a cached service (e.g. a gateway left busy by a figure)."""
        service = self._services.pop(name, None)
        if isinstance(service, Service) and service.child is not None:
            self.procs.stop(service.child)

    def bare_flask(self) -> Service:
        return self._cached(
            "bare-flask",
            lambda: contenders.start_bare_flask(
                self.procs, gateway_dir=self.gateway_dir
            ),
        )

    def litellm(self) -> Service:
        """Return LiteLLM's proxy, configured with every upstream."""
        if not self.settings.litellm:
            raise Unavailable(
                "skipped in smoke mode"
                if self.settings.mode == "smoke"
                else "disabled with --no-litellm"
            )

        def start() -> Service:
            self.litellm_version = contenders.ensure_litellm(self.litellm_venv, log)
            models = {
                MODEL: f"http://127.0.0.1:{self.upstream('nginx').port}",
                STREAM_MODEL: f"http://127.0.0.1:{self.upstream('stream').port}",
                SLOW_MODEL: f"http://127.0.0.1:{self.upstream('slow').port}",
            }
            service = contenders.start_litellm(
                self.procs, self.litellm_venv, models, self.workdir, workers=1
            )
            log(f"   LiteLLM {self.litellm_version} ready in {service.startup_s:.0f} s")
            return service

        return self._cached("litellm", start)

    # -- targets ---------------------------------------------------------------

    def target(
        self,
        key: str,
        label: str,
        service: Callable[[], Service],
        path: str,
        model: str = MODEL,
        stream: bool = False,
    ) -> Target:
        """Return a checked target; n/a (with the reason) when it cannot answer."""
        if key in self._targets:
            return self._targets[key]
        body = chat_body(model, stream=stream)
        try:
            found = Target(key, label, service(), path, body, stream=stream).check()
        except Unavailable as err:
            found = Target(key, label, Service(key, 0), path, body, stream, False)
            found.reason = str(err)
        if not found.available:
            log(f"   {label}: n/a ({found.reason})")
        self._targets[key] = found
        return found

    def all_targets(self) -> dict[str, Target]:
        return dict(self._targets)

    def direct(self) -> Target:
        return self.target(
            "direct", "direct (nginx)", lambda: self.upstream("nginx"), CHAT
        )

    def api_targets(self) -> list[Target]:
        """The non-streaming contenders (direct excluded)."""
        return [
            *self.gateway_targets(),
            *self.info_targets(),
            *self.lean_targets(),
            self.target("bare_flask", "bare Flask", self.bare_flask, CHAT),
            self.target("litellm", "LiteLLM proxy", self.litellm, CHAT),
        ]

    def lean_targets(self) -> list[Target]:
        """Issue 17: the naive ten-line proxy next to the gateway as deployed.

        At the shipped worker count (1) and, in the full run, at 2 workers (one
        per core here; the gateway's limits and slots then live in Redis).
        """
        targets = [
            self.target(
                "naive_proxy",
                "naive proxy (Flask + requests)",
                self.naive,
                CHAT,
            ),
            self.target(
                "gateway_deployed_chat",
                "gateway as deployed /v1/chat/completions",
                self.deployed,
                CHAT,
            ),
        ]
        if self.baseline_dir is not None:
            targets.append(
                self.target(
                    "gateway_deployed_chat_baseline",
                    f"gateway as deployed /v1/chat/completions ({self.baseline_tag})",
                    lambda: self.deployed(1, self.baseline_dir, "-baseline"),
                    CHAT,
                )
            )
        if self.settings.mode == "full":
            targets += [
                self.target(
                    "naive_proxy_2w",
                    "naive proxy, 2 workers",
                    lambda: self.naive(2),
                    CHAT,
                ),
                self.target(
                    "gateway_deployed_chat_2w",
                    "gateway as deployed /v1/chat/completions, 2 workers",
                    lambda: self.deployed(2),
                    CHAT,
                ),
            ]
        return targets

    def gateway_targets(self) -> list[Target]:
        """The gateway's non-streaming routes."""
        return [
            self.target(
                "gateway_message",
                "gateway /llm/message",
                lambda: self.gateway("nginx"),
                MESSAGE,
            ),
            self.target(
                "gateway_chat",
                "gateway /v1/chat/completions",
                lambda: self.gateway("nginx"),
                CHAT,
            ),
        ]

    def info_targets(self) -> list[Target]:
        """The gateway with its default INFO access logs (measured once)."""
        return [
            self.target(
                "gateway_message_info",
                "gateway /llm/message, INFO logs",
                lambda: self.gateway("nginx", "INFO"),
                MESSAGE,
            ),
            self.target(
                "gateway_chat_info",
                "gateway /v1/chat/completions, INFO logs",
                lambda: self.gateway("nginx", "INFO"),
                CHAT,
            ),
        ]

    def direct_stream(self) -> Target:
        return self.target(
            "direct_stream",
            "direct (stream upstream)",
            lambda: self.upstream("stream"),
            CHAT,
            STREAM_MODEL,
            stream=True,
        )

    def slow_targets(self) -> tuple[Target, list[Target]]:
        """The direct call and the streaming routes, on the slow upstream."""
        direct = self.target(
            "direct_stream_slow",
            "direct (slow stream upstream)",
            lambda: self.upstream("slow"),
            CHAT,
            SLOW_MODEL,
            stream=True,
        )
        return direct, [
            self.target(
                "gateway_chat_stream_slow",
                "gateway /v1/chat/completions stream (slow upstream)",
                lambda: self.gateway("slow"),
                CHAT,
                SLOW_MODEL,
                stream=True,
            ),
            self.target(
                "gateway_message_stream_slow",
                "gateway /llm/message stream (slow upstream)",
                lambda: self.gateway("slow"),
                MESSAGE,
                SLOW_MODEL,
                stream=True,
            ),
            self.target(
                "litellm_stream_slow",
                "LiteLLM proxy stream (slow upstream)",
                self.litellm,
                CHAT,
                SLOW_MODEL,
                stream=True,
            ),
        ]

    def stream_targets(self) -> list[Target]:
        return [
            self.target(
                "gateway_chat_stream",
                "gateway /v1/chat/completions stream",
                lambda: self.gateway("stream"),
                CHAT,
                STREAM_MODEL,
                stream=True,
            ),
            self.target(
                "gateway_message_stream",
                "gateway /llm/message stream",
                lambda: self.gateway("stream"),
                MESSAGE,
                STREAM_MODEL,
                stream=True,
            ),
            self.target(
                "litellm_stream",
                "LiteLLM proxy stream",
                self.litellm,
                CHAT,
                STREAM_MODEL,
                stream=True,
            ),
        ]


def run_figure(name: str, lab: Lab, settings: figures.Settings, result: dict) -> None:
    """Run one figure and store its data in ``result``."""
    if name == "latency":
        result["figures"]["latency"] = figures.latency(
            settings, lab.direct(), lab.api_targets(), (), log
        )
    elif name == "throughput":
        direct = lab.direct()
        data = figures.throughput(settings, [direct, *lab.api_targets()], (), log)
        result["figures"]["throughput"] = data
        gateways = ["gateway_message", "gateway_chat"]
        deployed = ["gateway_deployed_chat", "gateway_deployed_chat_baseline"]
        result["ratios"] = {
            "bare_flask": figures.ratios(data, gateways, "bare_flask"),
            "litellm": figures.ratios(data, gateways, "litellm"),
            "naive_proxy": figures.ratios(data, deployed, "naive_proxy"),
            "naive_proxy_2w": figures.ratios(
                data, ["gateway_deployed_chat_2w"], "naive_proxy_2w"
            ),
        }
    elif name == "streaming":
        result["figures"]["streaming"] = figures.streaming(
            settings, lab.direct_stream(), lab.stream_targets(), log
        )
    elif name == "cancellation":
        result["figures"]["cancellation"] = cancellation_figure(lab, settings)
    elif name == "memory":
        result["figures"]["memory"] = memory_figure(lab, settings)
    elif name == "capacity":
        result["figures"]["capacity"] = capacity_figure(lab, settings)


def memory_figure(lab: Lab, settings: figures.Settings) -> dict:
    """RSS growth of a fresh gateway (no earlier load in its history)."""
    url = f"http://127.0.0.1:{lab.upstream('nginx').port}"
    fresh = contenders.start_gateway(
        lab.procs, "gateway-memory", url, gateway_dir=lab.gateway_dir
    )
    try:
        targets = [
            Target("gateway_message", "", fresh, MESSAGE, chat_body()).check(),
            Target("gateway_chat", "", fresh, CHAT, chat_body()).check(),
        ]
        return {"gateway": figures.memory(settings, targets, fresh.rss, log)}
    finally:
        if fresh.child is not None:
            lab.procs.stop(fresh.child)


def cancellation_figure(lab: Lab, settings: figures.Settings) -> dict:
    """Cancel mid-stream on a chatty upstream, then on a slow one.

    The slow one (an upstream silent between chunks, like a model working on
    a long prompt) shows how long a relay takes to notice a client that left
    while it had nothing to send.
    """
    out = {}
    lab.upstream("stream")
    fast = lab.upstreams["stream"]
    assert isinstance(fast, StreamServer)
    out["fast"] = figures.cancellation(
        settings,
        lab.direct_stream(),
        lab.stream_targets(),
        fast,
        settings.cancel_after_chunks,
        log,
    )
    direct, slow_targets = lab.slow_targets()
    slow = lab.upstreams["slow"]
    assert isinstance(slow, StreamServer)
    out["slow"] = figures.cancellation(settings, direct, slow_targets, slow, 1, log)
    return out


def capacity_figure(lab: Lab, settings: figures.Settings) -> dict:
    """Slow streams: the direct call (the harness's own limit), gateway, LiteLLM."""
    direct, (chat, message, litellm) = lab.slow_targets()
    # One gateway route is enough (threads, not routes, bound the streams):
    # the relay, or /llm/message streaming while the relay is missing.
    chosen = chat if chat.available or not message.available else message
    gateway = dataclasses.replace(chosen, key="gateway_stream_slow")
    data = figures.capacity(
        settings,
        [
            (direct, "/v1/models"),
            (gateway, "/health/live"),
            (litellm, "/health/liveliness"),
        ],
        log,
    )
    # Streams the gateway could not serve may still be queued in it.
    lab.stop("gateway-slow-warning")
    return data


def profile_gateway(lab: Lab, out_dir: Path, stamp: str, seconds: float) -> dict:
    """Sample the gateway's worker under load on each route that answers."""
    out = {}
    # The gateway as deployed too, in the full run (smoke stays about a minute).
    deployed = lab.lean_targets()[1:2] if lab.settings.mode == "full" else []
    for target in [*lab.gateway_targets(), *deployed]:
        if not target.available or target.service.pid is None:
            out[target.key] = {"available": False, "reason": target.reason}
            continue
        workers = sysinfo.children(target.service.pid)
        if not workers:
            out[target.key] = {"available": False, "reason": "no worker process"}
            continue
        log(f">> profiling {target.label} for {seconds:g} s")
        raw = out_dir / f"{stamp}-profile-{target.key}.txt"
        out[target.key] = profiling.record(target, workers[0], seconds, raw)
        if out[target.key].get("available"):
            # Named after the mode, like the report: the full run's flame graphs
            # are kept in git beside full-latest.md, which links them.
            svg = out_dir / f"{lab.settings.mode}-latest-profile-{target.key}.svg"
            svg.write_text(profiling.flamegraph(raw.read_text(), target.label))
            out[target.key]["svg_file"] = svg.name
    return out


def gunicorn_settings(gateway_dir: Path) -> dict | None:
    """Read the shipped gunicorn.conf.py's values as the gateway runs them."""
    code = (
        "import json, runpy; c = runpy.run_path('gunicorn.conf.py'); "
        "print(json.dumps({k: c.get(k) for k in "
        "('worker_class', 'workers', 'threads', 'keepalive', 'timeout')}))"
    )
    env = contenders.clean_env()  # the environment the gateway gets
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=gateway_dir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def versions(gateway_dir: Path, litellm_version: str | None) -> dict:
    init = (gateway_dir / "llm_service" / "__init__.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', init)
    return {
        "llm-service": match[1] if match else None,
        "llm-service commit": sysinfo.git_revision(gateway_dir),
        "python": sys.version.split()[0],
        "flask": sysinfo.package_version("flask"),
        "werkzeug": sysinfo.package_version("werkzeug"),
        "gunicorn": sysinfo.package_version("gunicorn"),
        "requests": sysinfo.package_version("requests"),
        "urllib3": sysinfo.package_version("urllib3"),
        "flask-limiter": sysinfo.package_version("flask-limiter"),
        "marshmallow": sysinfo.package_version("marshmallow"),
        "redis": sysinfo.package_version("redis"),
        "hiredis": sysinfo.package_version("hiredis"),
        "nginx": nginx_version(),
        "wrk": wrk_version(),
        "litellm": litellm_version,
        "py-spy": profiling.py_spy_version(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Measure what the gateway costs next to a direct call, a bare "
        "Flask app and LiteLLM's proxy.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="quick mode (about a minute, no LiteLLM): keeps the harness alive in CI",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=FIGURES,
        metavar="FIGURE",
        help=f"run only these figures ({', '.join(FIGURES)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where results go (default: bench/results)",
    )
    parser.add_argument(
        "--runs", type=int, help="repeat each repeated figure this many times"
    )
    parser.add_argument(
        "--no-litellm", action="store_true", help="skip LiteLLM's proxy"
    )
    parser.add_argument(
        "--litellm-venv",
        help="LiteLLM's virtual environment (default: $BENCH_LITELLM_VENV or "
        f"{contenders.DEFAULT_LITELLM_VENV})",
    )
    parser.add_argument(
        "--baseline-dir",
        type=Path,
        help="another checkout of the gateway, measured as deployed in the same "
        "run (before/after a change)",
    )
    parser.add_argument(
        "--gateway-dir",
        type=Path,
        default=ROOT,
        help="checkout of the gateway to measure (default: this one)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    args = parse_args(argv)
    settings = figures.SMOKE if args.smoke else figures.FULL
    if args.runs:
        settings = dataclasses.replace(settings, runs=args.runs)
    if args.no_litellm:
        settings = dataclasses.replace(settings, litellm=False)
    selected = [f for f in FIGURES if not args.only or f in args.only]
    gateway_dir = args.gateway_dir.resolve()
    started = time.time()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    fd_limit = raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    log(f">> llm-service benchmark ({settings.mode}): {', '.join(selected)}")
    log(f"   logs and configs in {workdir}")
    result: dict = {
        "schema": 1,
        "mode": settings.mode,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(
            timespec="seconds"
        ),
        "machine": sysinfo.machine(),
        "settings": {
            **dataclasses.asdict(settings),
            "figures": selected,
            "gateway_dir": str(gateway_dir),
            "gunicorn": gunicorn_settings(gateway_dir),
            "open_files_limit": fd_limit,
        },
        # Read now: the checkout may change while the run goes on.
        "versions": versions(gateway_dir, None),
        "figures": {},
        "errors": [],
        "notes": [],
    }
    interrupted = False
    lab = None
    try:
        with Processes(workdir) as procs:
            lab = Lab(
                procs,
                workdir,
                settings,
                gateway_dir,
                contenders.litellm_venv(args.litellm_venv),
            )
            if args.baseline_dir is not None:
                lab.baseline_dir = args.baseline_dir.resolve()
                revision = sysinfo.git_revision(lab.baseline_dir)
                lab.baseline_tag = f"baseline {revision or lab.baseline_dir.name}"
            for name in selected:
                if name == "profile":
                    continue
                log(f">> figure: {name}")
                try:
                    run_figure(name, lab, settings, result)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as err:
                    result["errors"].append(f"{name}: {type(err).__name__}: {err}")
                    log(f"!! {name} failed:\n{traceback.format_exc()}")
            result["targets"] = report.evaluate(result["figures"])
            if "profile" in selected:
                profile_if_needed(lab, settings, result, args.out, stamp)
    except KeyboardInterrupt:
        interrupted = True
        result["errors"].append("interrupted before the end")
        log("!! interrupted: stopping every process")
    result.setdefault("targets", report.evaluate(result["figures"]))
    result["contenders"] = {
        key: {"label": t.label, "available": t.available, "reason": t.reason}
        for key, t in (lab.all_targets() if lab else {}).items()
    }
    result["versions"]["litellm"] = lab.litellm_version if lab else None
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["duration_s"] = round(time.time() - started, 1)
    md = report.write(result, args.out, stamp, log)
    log("")
    log("\n".join(report.summary_table(result["targets"])))
    log("")
    headline = report.headline_table(result["figures"])
    if headline:
        log("\n".join(headline))
        log("")
    log(f">> done in {result['duration_s']:.0f} s; report: {md}")
    if result["errors"]:
        log(f"!! harness errors ({len(result['errors'])}); logs kept in {workdir}")
        for error in result["errors"]:
            log(f"   {error}")
        return 130 if interrupted else 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def profile_if_needed(
    lab: Lab, settings: figures.Settings, result: dict, out_dir: Path, stamp: str
) -> None:
    """Profile the gateway when a latency or throughput target is missed.

    Smoke mode always profiles briefly, so the profiling path never rots.
    """
    judged = [
        row
        for row in result["targets"]
        if row["figure"].startswith(("added latency", "throughput"))
    ]
    if settings.mode != "smoke" and judged and all(r["met"] for r in judged):
        result["notes"].append("every latency and throughput target met: not profiled")
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        result["profiles"] = profile_gateway(
            lab, out_dir, stamp, settings.profile_seconds
        )
    except Exception as err:
        result["errors"].append(f"profile: {type(err).__name__}: {err}")
        log(f"!! profile failed:\n{traceback.format_exc()}")


if __name__ == "__main__":
    sys.exit(main())
