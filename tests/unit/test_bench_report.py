"""bench/report.py: the data, rendered by its Jinja2 template; a smoke run's
report can never pass for the full run's."""

import pytest

from bench import report
from bench.figures import percentile


def spread(median):
    return {"median": median, "min": median * 0.9, "max": median * 1.1, "runs": 3}


def target(label):
    return {
        "available": True,
        "label": label,
        "p50_ms": spread(1.2),
        "p99_ms": spread(3.4),
        "added_p50_ms": spread(0.4),
        "added_p99_ms": spread(1.1),
        "errors": 0,
    }


RESULT = {
    "mode": "smoke",
    "started_at": "2026-01-01T00:00:00Z",
    "duration_s": 61.4,
    "machine": {
        "cpu_model": "cpu",
        "cores": 2,
        "memory_gib": 4,
        "os": "Linux",
        "kernel": "6",
        "load_average_at_start": 0.5,
    },
    "versions": {"python": "3.11", "litellm": None},
    "settings": {"runs": 1},
    "figures": {
        "latency": {
            "requests_per_run": 2000,
            "targets": {
                "direct": target("direct"),
                "gateway_message": target("gateway /llm/message"),
                "litellm": {"available": False, "label": "LiteLLM", "reason": "off"},
            },
        }
    },
    "notes": ["a note"],
}


def test_the_report_renders_data_through_its_template():
    result = {**RESULT, "targets": report.evaluate(RESULT["figures"])}
    text = report.markdown(result)
    assert text.startswith("# llm-service benchmark (smoke)\n\nStarted ")
    assert "took 61 s." in text
    assert "**Versions**: python 3.11\n" in text
    assert "One request at a time, 2,000 per target per run" in text
    assert "| gateway /llm/message | 1.200 (1.080-1.320) |" in text
    assert "| LiteLLM | n/a (off) |" in text
    assert "## Notes\n\n- a note\n" in text
    assert text.endswith("- a note\n")
    assert "\n\n\n" not in text


@pytest.mark.parametrize("q", [0, 1, 25, 50, 95, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]])
def test_percentile_is_linear_between_ranks(values, q):
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    expected = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    assert percentile(values, q) == pytest.approx(expected)


def test_one_formatter():
    assert report.fmt(None) == "-"
    assert report.fmt(1234.5, 1) == "1,234.5"


@pytest.mark.parametrize("mode", ["full", "smoke"])
def test_reports_are_named_after_their_mode(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(report, "markdown", lambda result: f"# {result['mode']}\n")
    written = report.write({"mode": mode}, tmp_path, "20250101T000000Z", print)
    assert written == tmp_path / f"20250101T000000Z-{mode}.md"
    assert (tmp_path / f"{mode}-latest.md").read_text() == f"# {mode}\n"
    assert (tmp_path / f"{mode}-latest.json").exists()
    assert not (tmp_path / "latest.md").exists()


def test_a_smoke_run_leaves_the_full_report_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "markdown", lambda result: f"# {result['mode']}\n")
    report.write({"mode": "full"}, tmp_path, "20250101T000000Z", print)
    report.write({"mode": "smoke"}, tmp_path, "20250102T000000Z", print)
    assert (tmp_path / "full-latest.md").read_text() == "# full\n"


def _throughput(**per_key):
    """``{key: (rps, cpu_ms)}`` at c=16 as bench.figures.throughput shapes it."""
    return {
        "concurrencies": [16],
        "targets": {
            key: {
                "available": True,
                "label": key,
                "by_concurrency": {
                    "16": {"rps": spread(rps), "cpu_ms_per_request": spread(cpu)}
                },
            }
            for key, (rps, cpu) in per_key.items()
        },
    }


def test_access_log_share_is_the_info_minus_warning_cpu_over_info():
    figures = {
        "throughput": _throughput(gateway_chat=(400, 2.0), gateway_chat_info=(300, 2.5))
    }
    share = report.access_log_share(figures)
    assert share["share"] == pytest.approx(0.2)
    rows = [r for r in report.evaluate(figures) if "access log" in r["figure"]]
    assert rows[0]["met"] is False
    assert "20%" in rows[0]["measured"]


def test_the_gateway_as_deployed_is_judged_against_the_naive_proxy():
    deployed, naive = target("deployed"), target("naive")
    deployed["added_p50_ms"], naive["added_p50_ms"] = spread(2.0), spread(1.5)
    figures = {
        "latency": {
            "targets": {"gateway_deployed_chat": deployed, "naive_proxy": naive}
        },
        "throughput": _throughput(
            gateway_deployed_chat=(300, 4.0), naive_proxy=(600, 1.4)
        ),
    }
    rows = {r["figure"]: r for r in report.evaluate(figures)}
    p50 = rows["added latency p50 vs naive proxy"]
    assert p50["met"] is False
    assert p50["gap"] == "0.50 ms over"
    assert rows["added latency p99 as deployed"]["met"] is True
    rps = rows["throughput vs naive proxy, c=16"]
    assert rps["met"] is False
    assert rps["measured"].startswith("0.50x")


def test_a_profile_renders_as_a_standalone_flame_graph():
    from xml.etree import ElementTree

    from bench.profiling import flamegraph

    raw = "main (app.py:1);handle (a/b.py:2) 90\nmain (app.py:1);<idle> 10\n"
    svg = flamegraph(raw, "gateway <chat> & co")
    root = ElementTree.fromstring(svg)  # noqa: S314 (our own output)
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert "handle (a/b.py): 90.0 %" in titles
    assert "main (app.py): 100.0 %" in titles
