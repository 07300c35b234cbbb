"""Where the gateway's CPU time goes: py-spy samples a worker under wrk load.

py-spy attaches from outside (no change to the gateway) and samples without
pausing it (``--nonblocking``). Its raw output (collapsed stacks, one
``frame;frame;... count`` line per distinct stack) is saved beside the report
and summarized three ways: by component (the package of the innermost frame,
so the shares add up to 100 %), by function (self time), and by gateway step
(inclusive time of the frames that make up a request).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

from .contenders import Target
from .load import run_wrk

#: (component, pattern on a frame's file path), first match wins. py-spy shows
#: installed packages' paths from the package directory on ("flask/app.py").
COMPONENTS = [
    ("llm_service", re.compile(r"(^|/)llm_service/")),
    ("flask-limiter + limits", re.compile(r"(^|/)(flask_limiter|limits)/")),
    ("marshmallow", re.compile(r"(^|/)marshmallow/")),
    ("flask", re.compile(r"(^|/)flask/")),
    ("werkzeug", re.compile(r"(^|/)werkzeug/")),
    ("requests", re.compile(r"(^|/)requests/")),
    ("urllib3", re.compile(r"(^|/)urllib3/")),
    ("backoff", re.compile(r"(^|/)backoff/")),
    ("gunicorn", re.compile(r"(^|/)gunicorn/")),
    ("logging", re.compile(r"(^|/)logging/")),
    ("json", re.compile(r"(^|/)json/")),
    ("http.client + email (stdlib)", re.compile(r"(^|/)(http|email)/")),
    ("socket + selectors (stdlib)", re.compile(r"(^|/)(socket|ssl|selectors)\.py")),
    (
        "threading + futures (stdlib)",
        re.compile(r"(^|/)(threading|queue)\.py|concurrent/"),
    ),
    (
        "os.path + uuid (stdlib)",
        re.compile(r"genericpath|posixpath|(^|/)(os|uuid)\.py"),
    ),
]
#: Steps of a request: (name, pattern on the joined "func (file)" frames).
#: Inclusive: a sample counts for every step its stack is inside of.
STEPS = [
    ("inside the Flask app (wsgi_app)", re.compile(r"Flask\.wsgi_app \(")),
    ("upstream HTTP call (requests + urllib3)", re.compile(r"Session\.request \(")),
    ("rate limit check (flask-limiter)", re.compile(r"[(/]flask_limiter/")),
    ("request body parse + validation", re.compile(r"load_json_body \(")),
    (
        "response serialization (schema dump, JSON)",
        re.compile(
            r"Schema\.dump \(|jsonify \(|DefaultJSONProvider\.(dumps|response) \("
        ),
    ),
    ("access log record (_log_access)", re.compile(r"_log_access \(")),
    (
        "pipeline hooks (correlation id, headers)",
        re.compile(r"_start_request \(|_finish_response \("),
    ),
    ("gunicorn: parse request, write response", re.compile(r"[(/]gunicorn/http/")),
]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    """Return the py-spy executable next to this interpreter or on PATH."""
    import sys

    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def py_spy_version() -> str | None:
    binary = py_spy()
    if binary is None:
        return None
    result = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return result.stdout.strip().removeprefix("py-spy ") or None


def record(
    target: Target, pid: int, seconds: float, output: Path, connections: int = 16
) -> dict:
    """Sample ``pid`` while wrk loads ``target``; return the summary."""
    binary = py_spy()
    if binary is None:
        return {"available": False, "reason": "py-spy is not installed"}
    load_result: dict = {}

    def load() -> None:
        load_result.update(run_wrk(target, connections, seconds + 2))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    argv = [binary, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    # --gil: only the thread holding the GIL is sampled, i.e. where the one
    # core a gthread worker can use goes (threads waiting on sockets don't).
    argv += ["--rate", "200", "--gil", "--nonblocking", "--format", "raw"]
    argv += ["--output", str(output)]
    spy = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    loader.join(seconds + 70)
    if spy.returncode != 0 or not output.exists():
        return {
            "available": False,
            "reason": f"py-spy failed: {(spy.stderr or spy.stdout).strip()[-300:]}",
        }
    summary = summarize(output.read_text())
    summary.update(
        available=True,
        target=target.label,
        seconds=seconds,
        connections=connections,
        rps_while_sampled=round(load_result.get("rps", 0.0)),
        raw_file=output.name,
    )
    return summary


def _parse(raw: str) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for text in stack.split(";"):
            match = _FRAME.match(text)
            func, file = (match["func"], match["file"]) if match else (text, "")
            frames.append((func, file))
        stacks.append((frames, int(count)))
    return stacks


def _component(file: str) -> str:
    for name, pattern in COMPONENTS:
        if pattern.search(file):
            return name
    if "/site-packages/" in file:
        return "other packages"
    return "other stdlib / interpreter"


def summarize(raw: str, top: int = 12) -> dict:
    """Turn collapsed stacks into shares by component, function and step."""
    stacks = _parse(raw)
    total = sum(count for _, count in stacks) or 1
    components: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        func, file = frames[-1]
        components[_component(file)] += count
        short = "/".join(file.split("/")[-2:])
        functions[f"{func} ({short})"] += count
        joined = ";".join(f"{f} ({p})" for f, p in frames)
        for name, pattern in STEPS:
            if pattern.search(joined):
                steps[name] += count

    def shares(counter: Counter[str], limit: int | None = None) -> list[list]:
        return [
            [name, round(count * 100 / total, 1)]
            for name, count in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "by_component_pct": shares(components),
        "top_functions_self_pct": shares(functions, top),
        "by_step_inclusive_pct": shares(steps),
    }


# -- flame graph -------------------------------------------------------------------

_WIDTH = 1200
_ROW = 16


def flamegraph(raw: str, title: str, min_share: float = 0.002) -> str:
    """Render collapsed stacks as a standalone flame graph SVG (no scripts).

    Frames narrower than ``min_share`` of the samples are left out; each box's
    tooltip (``<title>``) gives the frame and its inclusive share.
    """
    from html import escape

    root: dict = {"n": 0, "kids": {}}
    for frames, count in _parse(raw):
        node = root
        node["n"] += count
        for func, file in frames:
            short = "/".join(file.split("/")[-2:])
            name = f"{func} ({short})" if short else func
            node = node["kids"].setdefault(name, {"n": 0, "kids": {}})
            node["n"] += count
    total = root["n"] or 1
    boxes: list[tuple[int, float, float, str, int]] = []
    depth_max = 0

    def walk(node: dict, depth: int, x: float) -> None:
        nonlocal depth_max
        for name, kid in sorted(node["kids"].items()):
            width = kid["n"] / total * _WIDTH
            if kid["n"] / total >= min_share:
                boxes.append((depth, x, width, name, kid["n"]))
                depth_max = max(depth_max, depth)
                walk(kid, depth + 1, x)
            x += width

    walk(root, 0, 0.0)
    height = (depth_max + 3) * _ROW
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" '
        f'height="{height}" font-family="monospace" font-size="11">',
        '<rect width="100%" height="100%" fill="#fff"/>',
        f'<text x="4" y="13">{escape(title)}: {total:,} samples '
        "(py-spy --gil; hover for shares)</text>",
    ]
    for depth, x, width, name, count in boxes:
        y = height - (depth + 1) * _ROW
        hue = 10 + sum(name.split(" (")[-1].encode()) % 50
        share = count * 100 / total
        label = escape(name[: int(width / 6.6)]) if width > 20 else ""
        out.append(
            f"<g><title>{escape(name)}: {share:.1f} %</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{max(width - 0.5, 0.5):.1f}" '
            f'height="{_ROW - 1}" fill="hsl({hue},85%,60%)"/>'
            f'<text x="{x + 2:.1f}" y="{y + 12}">{label}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
