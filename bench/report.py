"""The run's outputs: targets met or not, the JSON result and the markdown report.

This module computes the data (which targets are met, the rows of each table);
the report's text, headings and prose are the template
``bench/templates/report.md.j2`` (Jinja2, a dependency of Flask already).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: Gateway targets whose figures the summary judges: (key, label).
GATEWAY_ROUTES = [
    ("gateway_message", "gateway /llm/message"),
    ("gateway_chat", "gateway /v1/chat/completions"),
]
GATEWAY_STREAMS = [
    ("gateway_chat_stream", "gateway /v1/chat/completions stream"),
    ("gateway_message_stream", "gateway /llm/message stream"),
]

TARGETS = {
    "added_p50_ms": 1.0,
    "added_p99_ms": 5.0,
    "vs_bare": 0.60,
    "vs_litellm": 3.0,
    "chunk_delay_p99_ms": 1.0,
    "streams": 1000,
    "rss_growth_pct": 5.0,
    "cancel_gap_ms": 100.0,
    "access_log_share": 0.10,
}
#: Issue 17: the gateway as deployed next to the naive proxy, same workers.
LEAN_PAIRS = [
    ("gateway_deployed_chat", "naive_proxy", "1 worker"),
    ("gateway_deployed_chat_2w", "naive_proxy_2w", "2 workers"),
]


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure for people: thousands separated, ``-`` when there is none."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _spread(entry: dict | None, digits: int = 2) -> str:
    """Format ``{"median", "min", "max"}`` as ``median (min-max)``."""
    if not entry:
        return "-"
    if entry["runs"] == 1:
        return fmt(entry["median"], digits)
    return (
        f"{fmt(entry['median'], digits)} "
        f"({fmt(entry['min'], digits)}-{fmt(entry['max'], digits)})"
    )


def _median(entry: dict | None) -> float | None:
    return entry["median"] if entry else None


def _row(figure, contender, target, measured, met, gap="") -> dict:
    return {
        "figure": figure,
        "contender": contender,
        "target": target,
        "measured": measured,
        "met": met,
        "gap": gap,
    }


def _over(value: float, limit: float, unit: str) -> str:
    return "" if value <= limit else f"{fmt(value - limit)} {unit} over"


def evaluate(figures: dict) -> list[dict]:
    """Judge every target against the figures; n/a where a figure is missing."""
    rows: list[dict] = []
    rows += _latency_rows(figures.get("latency"))
    rows += _throughput_rows(figures.get("throughput"))
    rows += _streaming_rows(figures.get("streaming"))
    rows += _capacity_rows(figures.get("capacity"))
    rows += _memory_rows(figures.get("memory"))
    rows += _cancel_rows(figures.get("cancellation"))
    rows += _lean_rows(figures)
    return rows


def _available(figure: dict | None, key: str) -> dict | None:
    entry = (figure or {}).get("targets", {}).get(key)
    return entry if entry and entry.get("available") else None


def access_log_share(figures: dict, c: str = "16") -> dict | None:
    """The INFO access log's share of a request's CPU (whole server process).

    ``(CPU/request at INFO - at WARNING) / CPU/request at INFO``, the gateway's
    /v1 route, medians of the same run; None when either was not measured.
    """
    figure = figures.get("throughput")
    info, quiet = (
        _available(figure, "gateway_chat_info"),
        _available(figure, "gateway_chat"),
    )
    if not info or not quiet:
        return None
    a = _median(info["by_concurrency"][c].get("cpu_ms_per_request"))
    b = _median(quiet["by_concurrency"][c].get("cpu_ms_per_request"))
    if not a or not b:
        return None
    return {"info_ms": a, "warning_ms": b, "share": (a - b) / a}


def _lean_rows(figures: dict) -> list[dict]:
    """Issue 17's targets: as deployed vs the naive proxy; the access log's CPU."""
    rows = []
    latency, throughput = figures.get("latency"), figures.get("throughput")
    for key, naive_key, workers in LEAN_PAIRS:
        label = f"gateway as deployed, {workers}"
        mine, theirs = _available(latency, key), _available(latency, naive_key)
        if mine and theirs and workers == "1 worker":
            a = _median(mine["added_p50_ms"])
            b = _median(theirs["added_p50_ms"])
            if a is not None and b is not None:
                rows.append(
                    _row(
                        "added latency p50 vs naive proxy",
                        label,
                        "≤ the naive proxy's",
                        f"{a:.2f} vs {b:.2f} ms",
                        a <= b,
                        _over(a, b, "ms"),
                    )
                )
            p99 = _median(mine["added_p99_ms"])
            if p99 is not None:
                limit = TARGETS["added_p99_ms"]
                rows.append(
                    _row(
                        "added latency p99 as deployed",
                        label,
                        f"≤ {limit:g} ms",
                        f"{p99:.2f} ms",
                        p99 <= limit,
                        _over(p99, limit, "ms"),
                    )
                )
        mine, theirs = _available(throughput, key), _available(throughput, naive_key)
        if not mine or not theirs:
            continue
        for c in throughput.get("concurrencies", []):
            a = _median(mine["by_concurrency"][str(c)]["rps"])
            b = _median(theirs["by_concurrency"][str(c)]["rps"])
            if not a or not b:
                continue
            ratio = a / b
            rows.append(
                _row(
                    f"throughput vs naive proxy, c={c}",
                    label,
                    "≥ 1.00x (same workers)",
                    f"{ratio:.2f}x ({a:,.0f} vs {b:,.0f} req/s)",
                    ratio >= 1,
                    "" if ratio >= 1 else f"needs {1 / ratio:.2f}x its req/s",
                )
            )
    share = access_log_share(figures)
    if share is not None:
        limit = TARGETS["access_log_share"]
        rows.append(
            _row(
                "access log CPU share (INFO vs WARNING), c=16",
                "gateway /v1/chat/completions",
                f"≤ {limit:.0%}",
                f"{share['share']:.0%} ({share['info_ms']:.3f} vs "
                f"{share['warning_ms']:.3f} ms/request)",
                share["share"] <= limit,
                "" if share["share"] <= limit else f"{share['share'] - limit:.0%} over",
            )
        )
    return rows


def _na_row(figure: str, label: str, target: str, entry: dict | None) -> dict:
    reason = entry.get("reason") if entry else "figure not run"
    return _row(figure, label, target, f"n/a ({reason})", None)


def _latency_rows(figure: dict | None) -> list[dict]:
    rows = []
    for key, label in GATEWAY_ROUTES:
        entry = (figure or {}).get("targets", {}).get(key)
        for name, limit in (
            ("added_p50_ms", "added_p50_ms"),
            ("added_p99_ms", "added_p99_ms"),
        ):
            title = f"added latency {name[6:9]}"
            target = f"≤ {TARGETS[limit]:g} ms"
            if not entry or not entry.get("available") or not entry.get(name):
                rows.append(_na_row(title, label, target, entry))
                continue
            value = entry[name]["median"]
            rows.append(
                _row(
                    title,
                    label,
                    target,
                    f"{_spread(entry[name])} ms",
                    value <= TARGETS[limit],
                    _over(value, TARGETS[limit], "ms"),
                )
            )
    return rows


def _throughput_rows(figure: dict | None) -> list[dict]:
    rows = []
    targets = (figure or {}).get("targets", {})
    for key, label in GATEWAY_ROUTES:
        for other, name, limit in (
            ("bare_flask", "bare Flask", TARGETS["vs_bare"]),
            ("litellm", "LiteLLM", TARGETS["vs_litellm"]),
        ):
            for c in (figure or {}).get("concurrencies", [16, 64]):
                title = f"throughput vs {name}, c={c}"
                target = f"≥ {limit:g}x" if limit >= 1 else f"≥ {limit:.0%}"
                mine, theirs = targets.get(key), targets.get(other)
                if not mine or not mine.get("available"):
                    rows.append(_na_row(title, label, target, mine))
                    continue
                if not theirs or not theirs.get("available"):
                    rows.append(_na_row(title, label, target, theirs))
                    continue
                a = _median(mine["by_concurrency"][str(c)]["rps"])
                b = _median(theirs["by_concurrency"][str(c)]["rps"])
                if not a or not b:
                    rows.append(_row(title, label, target, "n/a (no requests)", None))
                    continue
                ratio = a / b
                shown = f"{ratio:.2f}x" if limit >= 1 else f"{ratio:.0%}"
                measured = f"{shown} ({a:,.0f} vs {b:,.0f} req/s)"
                gap = "" if ratio >= limit else f"needs {limit / ratio:.2f}x its req/s"
                rows.append(_row(title, label, target, measured, ratio >= limit, gap))
    return rows


def _streaming_rows(figure: dict | None) -> list[dict]:
    rows = []
    target = f"≤ {TARGETS['chunk_delay_p99_ms']:g} ms, no batching"
    for key, label in GATEWAY_STREAMS:
        entry = (figure or {}).get("targets", {}).get(key)
        title = "added per-chunk delay p99"
        if (
            not entry
            or not entry.get("available")
            or not entry.get("added_delay_ms_p99")
        ):
            rows.append(_na_row(title, label, target, entry))
            continue
        value = entry["added_delay_ms_p99"]["median"]
        batched = entry["batched"]
        measured = (
            f"{_spread(entry['added_delay_ms_p99'])} ms, "
            f"batched: {'yes' if batched else 'no'}"
        )
        gap = _over(value, TARGETS["chunk_delay_p99_ms"], "ms")
        if batched:
            gap = ", ".join(
                filter(None, [gap, f"{entry['held_chunks']} chunks held back"])
            )
        met = value <= TARGETS["chunk_delay_p99_ms"] and not batched
        rows.append(_row(title, label, target, measured, met, gap))
    return rows


def _capacity_rows(figure: dict | None) -> list[dict]:
    targets = (figure or {}).get("targets", {})
    entry = targets.get("gateway_stream_slow")
    title, label = "concurrent slow streams held", "gateway"
    target = f"≥ {TARGETS['streams']:,}"
    if not entry or not entry.get("available"):
        return [_na_row(title, label, target, entry)]
    held = entry["max_held"]
    last = entry["by_level"][-1] if entry["by_level"] else None
    measured = f"{held:,}"
    if last and not last["held"]:
        measured += (
            f" (at {last['level']:,}: {last['peak_concurrent']:,} at once, "
            f"liveness max {fmt(last['health_ms_max'], 0)} ms)"
        )
    gap = "" if held >= TARGETS["streams"] else f"{TARGETS['streams'] - held:,} short"
    return [
        _row(title, entry["label"], target, measured, held >= TARGETS["streams"], gap)
    ]


def _memory_rows(figure: dict | None) -> list[dict]:
    target = f"≤ {TARGETS['rss_growth_pct']:g} %"
    entry = (figure or {}).get("gateway")
    title = "RSS growth over the requests"
    if not entry or not entry.get("available") or entry.get("growth_pct") is None:
        return [_na_row(title, "gateway", target, entry)]
    value = entry["growth_pct"]
    limit = TARGETS["rss_growth_pct"]
    measured = (
        f"{fmt(value, 1)} % ({_mib_list(entry['idle_worker_mib'])} → "
        f"{_mib_list(entry['after_worker_mib'])} MiB, {entry['requests']:,} requests)"
    )
    gap = "" if value <= limit else f"{fmt(value - limit, 1)} points over"
    return [_row(title, entry["label"], target, measured, value <= limit, gap)]


def _mib_list(values: list[float] | None) -> str:
    return " + ".join(f"{v:g}" for v in values) if values else "-"


def _cancel_rows(figure: dict | None) -> list[dict]:
    rows = []
    target = f"≤ {TARGETS['cancel_gap_ms']:g} ms"
    limit = TARGETS["cancel_gap_ms"]
    for variant, suffix in (("fast", ""), ("slow", "_slow")):
        part = (figure or {}).get(variant)
        title = f"cancellation gap (max), {variant} upstream"
        if part:
            title += f" ({part['interval_ms']:g} ms between chunks)"
        for key, label in GATEWAY_STREAMS:
            entry = (part or {}).get("targets", {}).get(key + suffix)
            if not entry or not entry.get("available"):
                rows.append(_na_row(title, label, target, entry))
                continue
            if entry["not_cancelled"] or entry["gap_ms_max"] is None:
                tried = entry["cancelled"] + entry["not_cancelled"]
                measured = f"{entry['not_cancelled']} of {tried} streams ran to the end"
                rows.append(
                    _row(title, label, target, measured, False, "not cancelled")
                )
                continue
            value = entry["gap_ms_max"]
            measured = f"{fmt(value, 1)} ms (p50 {fmt(entry['gap_ms_p50'], 1)} ms)"
            gap = _over(value, limit, "ms")
            rows.append(_row(title, label, target, measured, value <= limit, gap))
    return rows


# -- tables ------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _summary_rows(rows: list[dict]) -> list[list]:
    verdict = {True: "yes", False: "**no**", None: "n/a"}
    return [
        [
            r["figure"],
            r["contender"],
            r["target"],
            r["measured"],
            verdict[r["met"]],
            r["gap"],
        ]
        for r in rows
    ]


SUMMARY_HEADER = ["figure", "contender", "target", "measured", "met", "gap"]


def summary_table(rows: list[dict]) -> list[str]:
    """Return the targets as a markdown table."""
    return _table(SUMMARY_HEADER, _summary_rows(rows))


def _headline(figures: dict) -> tuple[list[str], list[list]]:
    """One row per non-streaming contender: the figures people ask for."""
    latency = figures.get("latency", {}).get("targets", {})
    throughput = figures.get("throughput", {})
    concurrencies = [str(c) for c in throughput.get("concurrencies", [])]
    keys = list(dict.fromkeys([*latency, *throughput.get("targets", {})]))
    rows = []
    for key in keys:
        lat = latency.get(key, {})
        thr = throughput.get("targets", {}).get(key, {})
        entry = lat or thr
        if not entry.get("available"):
            blanks = [""] * (len(concurrencies) + 2)
            rows.append([_label(entry), f"n/a ({entry.get('reason')})", *blanks])
            continue
        row = [
            _label(entry),
            fmt(_median(lat.get("added_p50_ms"))),
            fmt(_median(lat.get("added_p99_ms"))),
        ]
        by_c = thr.get("by_concurrency", {})
        row += [fmt(_median(by_c.get(c, {}).get("rps")), 0) for c in concurrencies]
        first = by_c.get(concurrencies[0], {}) if concurrencies else {}
        row.append(fmt(_median(first.get("cpu_ms_per_request")), 3))
        rows.append(row)
    header = ["contender", "added p50 ms", "added p99 ms"]
    header += [f"req/s c={c}" for c in concurrencies]
    header += [f"CPU ms/req c={concurrencies[0]}" if concurrencies else "CPU ms/req"]
    return header, rows


def headline_table(figures: dict) -> list[str]:
    """Return one row per non-streaming contender: the figures people ask for."""
    header, rows = _headline(figures)
    return _table(header, rows) if rows else []


def _label(entry: dict) -> str:
    return entry.get("label", "?")


def _na(entry: dict, blanks: int) -> list:
    return [_label(entry), f"n/a ({entry['reason']})", *[""] * blanks]


def _latency_table_rows(figure: dict) -> list[list]:
    return [
        [
            _label(entry),
            _spread(entry["p50_ms"], 3),
            _spread(entry["p99_ms"], 3),
            _spread(entry["added_p50_ms"], 3),
            _spread(entry["added_p99_ms"], 3),
            entry["errors"],
        ]
        if entry.get("available")
        else _na(entry, 4)
        for entry in figure["targets"].values()
    ]


def _throughput_table_rows(figure: dict) -> list[list]:
    rows = []
    for entry in figure["targets"].values():
        if not entry.get("available"):
            rows.append([_label(entry), "", f"n/a ({entry['reason']})", *[""] * 4])
            continue
        for c, values in entry["by_concurrency"].items():
            rows.append(
                [
                    _label(entry),
                    c,
                    _spread(values["rps"], 0),
                    values["non_2xx"],
                    values["socket_errors"],
                    _spread(values["latency_p99_ms"], 1),
                    _spread(values.get("cpu_ms_per_request"), 3),
                ]
            )
    return rows


def _ratio_rows(ratios: dict) -> list[list]:
    return [
        [f"{key} / {name}", c, f"{value:.2f}" if value is not None else "n/a"]
        for name, by_key in ratios.items()
        for key, by_c in by_key.items()
        for c, value in by_c.items()
    ]


def _streaming_table_rows(figure: dict) -> list[list]:
    return [
        [
            _label(entry),
            _spread(entry["ttfc_ms_p50"]),
            _spread(entry["added_ttfc_ms_p50"]),
            _spread(entry["delay_ms_p50"], 3),
            _spread(entry["delay_ms_p99"], 3),
            _spread(entry["added_delay_ms_p99"], 3),
            f"{entry['held_chunks']} / {entry['merged_events']}",
            entry["missing_chunks"],
            entry["errors"],
        ]
        if entry.get("available")
        else _na(entry, 7)
        for entry in figure["targets"].values()
    ]


def _capacity_table_rows(figure: dict) -> list[list]:
    rows = []
    for entry in figure["targets"].values():
        if not entry.get("available"):
            rows.append(_na(entry, 8))
            continue
        for level in entry["by_level"]:
            rows.append(
                [
                    _label(entry),
                    f"{level['level']:,}",
                    "yes" if level["held"] else "**no**",
                    f"{level['streams_ok']:,}",
                    f"{level['peak_concurrent']:,}",
                    fmt(level["first_chunk_wait_s_max"]),
                    f"{fmt(level['health_ms_p50'], 1)} / "
                    f"{fmt(level.get('health_ms_p95'), 1)} / "
                    f"{fmt(level['health_ms_max'], 1)} "
                    f"({level['health_over_limit_or_failed']} over)",
                    fmt(level["rss_total_mib"], 1),
                    level["threads_peak"] or "-",
                    fmt(level.get("cpu_cores")),
                ]
            )
    return rows


def _memory_table_rows(figure: dict) -> list[list]:
    return [
        [
            _label(entry),
            f"{entry['requests']:,} ({entry['errors']} errors)",
            _mib_list(entry["cold_worker_mib"]),
            _mib_list(entry["idle_worker_mib"]),
            _mib_list(entry["after_worker_mib"]),
            fmt(entry["growth_pct"], 1),
            f"{entry.get('threads_idle')} → {entry.get('threads_after')}",
        ]
        if entry.get("available")
        else _na(entry, 5)
        for entry in figure.values()
    ]


def _cancellation_table_rows(figure: dict) -> list[list]:
    return [
        [
            _label(entry),
            fmt(entry["gap_ms_p50"], 1),
            fmt(entry["gap_ms_max"], 1),
            f"{entry['cancelled']} / {entry['not_cancelled']}",
            entry["errors"],
        ]
        if entry.get("available")
        else [_label(entry), f"n/a ({entry['reason']})", "", "", ""]
        for entry in figure["targets"].values()
    ]


def _profile_tables(profile: dict) -> list[dict]:
    return [
        {
            "header": ["component (self)", "%"],
            "rows": [[n, v] for n, v in profile["by_component_pct"]],
        },
        {
            "header": ["gateway step (inclusive)", "%"],
            "rows": [[n, v] for n, v in profile["by_step_inclusive_pct"]],
        },
        {
            "header": ["function (self)", "%"],
            "rows": [[f"`{n}`", v] for n, v in profile["top_functions_self_pct"]],
        },
    ]


# -- markdown ----------------------------------------------------------------------


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["thousands"] = lambda value: f"{value:,}"
    env.filters["g"] = lambda value: f"{value:g}"
    env.filters["table"] = lambda t: "\n".join(_table(t["header"], t["rows"]))
    return env


def markdown(result: dict) -> str:
    """Render the whole result as the markdown report (``report.md.j2``)."""
    figures = result["figures"]
    headline_header, headline_rows = _headline(figures)
    tables: dict[str, dict] = {}
    if "latency" in figures:
        tables["latency"] = {
            "header": [
                "contender",
                "p50 ms",
                "p99 ms",
                "added p50 ms",
                "added p99 ms",
                "errors",
            ],
            "rows": _latency_table_rows(figures["latency"]),
        }
    if "throughput" in figures:
        tables["throughput"] = {
            "header": [
                "contender",
                "c",
                "req/s",
                "non-2xx",
                "socket errors",
                "wrk p99 ms",
                "server CPU ms/request",
            ],
            "rows": _throughput_table_rows(figures["throughput"]),
        }
        if result.get("ratios"):
            tables["ratios"] = {
                "header": ["ratio", "c", "value"],
                "rows": _ratio_rows(result["ratios"]),
            }
    if "streaming" in figures:
        tables["streaming"] = {
            "header": [
                "contender",
                "first chunk ms",
                "added first chunk ms",
                "delay p50 ms",
                "delay p99 ms",
                "added delay p99 ms",
                "held / merged",
                "missing",
                "errors",
            ],
            "rows": _streaming_table_rows(figures["streaming"]),
        }
    if "capacity" in figures:
        tables["capacity"] = {
            "header": [
                "contender",
                "streams",
                "held",
                "streams ok",
                "peak at once",
                "first chunk wait max s",
                "liveness p50 / p95 / max ms",
                "RSS MiB",
                "threads",
                "CPU cores",
            ],
            "rows": _capacity_table_rows(figures["capacity"]),
        }
    if "memory" in figures:
        tables["memory"] = {
            "header": [
                "contender",
                "requests",
                "cold MiB",
                "idle MiB",
                "after MiB",
                "growth %",
                "threads idle → after",
            ],
            "rows": _memory_table_rows(figures["memory"]),
        }
    cancellations = [
        (
            part,
            {
                "header": [
                    "contender",
                    "gap p50 ms",
                    "gap max ms",
                    "cancelled / not",
                    "errors",
                ],
                "rows": _cancellation_table_rows(part),
            },
        )
        for part in figures.get("cancellation", {}).values()
    ]
    profiles = [
        (key, profile, _profile_tables(profile) if profile.get("available") else [])
        for key, profile in (result.get("profiles") or {}).items()
    ]
    contenders = [
        [c["label"], "ok" if c["available"] else f"n/a ({c['reason']})"]
        for c in result.get("contenders", {}).values()
    ]
    text = (
        _environment()
        .get_template("report.md.j2")
        .render(
            result=result,
            figures=figures,
            summary={
                "header": SUMMARY_HEADER,
                "rows": _summary_rows(result["targets"]),
            },
            headline={"header": headline_header, "rows": headline_rows},
            contenders={"header": ["contender", "status"], "rows": contenders},
            tables=tables,
            cancellations=cancellations,
            profiles=profiles,
        )
    )
    return text.rstrip("\n") + "\n"


def write(result: dict, out_dir: Path, stamp: str, log: Callable[[str], None]) -> Path:
    """Write ``<stamp>-<mode>.json``/``.md`` and copies as ``<mode>-latest.*``.

    The mode (``full`` or ``smoke``) is in every name, so a one-minute smoke run
    can never pass for the full run whose figures the README quotes
    (``full-latest.md``, kept in the repository). Return the .md.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = result["mode"]
    json_path = out_dir / f"{stamp}-{mode}.json"
    md_path = out_dir / f"{stamp}-{mode}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown(result))
    latest = f"{mode}-latest"
    shutil.copyfile(json_path, out_dir / f"{latest}.json")
    shutil.copyfile(md_path, out_dir / f"{latest}.md")
    log(f">> wrote {json_path} and {md_path} (also {latest}.json, {latest}.md)")
    return md_path
