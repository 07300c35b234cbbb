"""bench/report.py: a smoke run's report can never pass for the full run's."""

import pytest

from bench import report


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
