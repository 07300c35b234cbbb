"""Break the product on purpose, one small break at a time, and see if a test notices.

Usage::

    python scripts/mutation_check.py                 # every break in the catalogue
    python scripts/mutation_check.py --only retry-400 --only no-jitter
    python scripts/mutation_check.py --list          # the catalogue, nothing run
    python scripts/mutation_check.py --tree /tmp/old --whole-files   # another tree

The catalogue (``scripts/mutations.toml``) names, per break, the file, the exact
original snippet, its replacement, what the break means and the tests to run.
The tree is copied once to a temporary directory (without ``.git``, caches,
``.venv`` or a local ``instance/config.py``); each break is written into the
copy, its tests run there (integration tests start gunicorn from the copy),
and the file is restored before the next one. The working tree is never
touched.

Each break ends as one of:

- ``killed``: a test failed (or could not even be collected);
- ``survived``: its tests passed, or none of them exists in this tree;
- ``not applicable``: the snippet is not in the file exactly once (the code
  changed: update the entry);
- ``error``: the broken file is not valid Python (the entry is wrong: a
  break that cannot even be imported proves nothing), or pytest could not
  run the tests as given, or timed out.

Not part of ``make test``: it runs the named tests once per break (minutes).
The exit status is 1 when a break survived or erred, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = Path(__file__).with_name("mutations.toml")
#: Left out of the copy: history, caches, virtualenvs and local deployment config.
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".tox",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".schemathesis",
    "*.egg-info",
    "htmlcov",
    "results",
)
LOCAL_FILES = ("instance/config.py", ".env")
#: pytest exit codes: 0 passed, 1 failed, 2 interrupted (collection errors too),
#: 5 nothing collected; 3 and 4 are pytest's own errors.
KILLED_CODES = {1, 2}


@dataclass
class Break:
    """One catalogue entry."""

    name: str
    file: str
    original: str
    replacement: str
    description: str
    tests: list[str]
    claim: str = ""
    k: str | None = None


@dataclass
class Outcome:
    name: str
    status: str  # killed, survived, not applicable, error
    seconds: float = 0.0
    detail: str = ""
    command: list[str] = field(default_factory=list)


def load_catalogue(path: Path) -> list[Break]:
    """Read and check the catalogue: unique names, every field present."""
    entries = tomllib.loads(path.read_text())["break"]
    breaks = [Break(**entry) for entry in entries]
    names = [b.name for b in breaks]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"duplicate break names: {sorted(duplicates)}")
    for entry in breaks:
        if not entry.original or entry.original == entry.replacement:
            raise SystemExit(f"{entry.name}: the break changes nothing")
        if not entry.tests:
            raise SystemExit(f"{entry.name}: names no tests")
    return breaks


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=IGNORED, symlinks=True)
    for name in LOCAL_FILES:
        (target / name).unlink(missing_ok=True)


def pytest_command(
    tree: Path, tests: list[str], k: str | None, timeout: float
) -> list[str] | None:
    """The pytest command for ``tests`` in ``tree``; None when none exists there."""
    present = [t for t in tests if (tree / t.split("::", 1)[0]).exists()]
    if not present:
        return None
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q"]
    command += ["-o", f"timeout={timeout:g}", *present]
    if k:
        command += ["-k", k]
    return command


def run_pytest(
    command: list[str], tree: Path, budget: float
) -> tuple[int | None, str, float]:
    """Run ``command`` in ``tree``: (exit code or None on timeout, output, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE_")}
    # Restored files may keep their size and mtime second: no stale bytecode.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=budget,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace")
        return None, output, time.monotonic() - started
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check(entry: Break, tree: Path, args: argparse.Namespace) -> Outcome:
    """Apply one break in ``tree``, run its tests, restore the file."""
    path = tree / entry.file
    if not path.exists():
        return Outcome(entry.name, "not applicable", detail=f"{entry.file} is gone")
    source = path.read_text()
    count = source.count(entry.original)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times"
        return Outcome(entry.name, "not applicable", detail=f"snippet {where}")
    k = None if args.whole_files else entry.k
    command = pytest_command(tree, entry.tests, k, args.test_timeout)
    if command is None:
        return Outcome(entry.name, "survived", detail="none of its tests exists here")
    broken = source.replace(entry.original, entry.replacement)
    if path.suffix == ".py":
        try:
            compile(broken, str(path), "exec")
        except SyntaxError as err:
            return Outcome(
                entry.name, "error", detail=f"the break is not valid Python: {err}"
            )
    path.write_text(broken)
    try:
        code, output, seconds = run_pytest(command, tree, args.timeout)
    finally:
        path.write_text(source)
    if code is None:
        status, detail = "error", f"timed out after {args.timeout:g} s"
    elif code in KILLED_CODES:
        status, detail = "killed", _first_failure(output)
    elif code == 0:
        status, detail = "survived", "its tests passed"
    elif code == 5:
        status, detail = "survived", "no test selected"
    else:
        status, detail = "error", f"pytest exit {code}:\n{tail(output)}"
    return Outcome(entry.name, status, seconds, detail, command)


#: pytest's summary lines, not log lines captured at level ERROR.
_SUMMARY_LINE = re.compile(r"(FAILED|ERROR) tests/")


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if _SUMMARY_LINE.match(line):
            return line.split(" - ", 1)[0]
    return "tests failed"


def baseline(breaks: list[Break], tree: Path, args: argparse.Namespace) -> None:
    """Every named test file must pass unbroken, or the results mean nothing."""
    files = sorted({t.split("::", 1)[0] for b in breaks for t in b.tests})
    command = pytest_command(tree, files, None, args.test_timeout)
    if command is None:
        return
    print(f">> baseline: {shlex.join(command[3:])}", flush=True)
    code, output, seconds = run_pytest(command, tree, args.timeout * 3)
    if code != 0:
        raise SystemExit(f"the unbroken tree fails its tests:\n{tail(output, 30)}")
    print(f">> baseline passed in {seconds:.0f} s", flush=True)


def report(outcomes: list[Outcome], breaks: dict[str, Break]) -> str:
    lines = ["| break | file | result | seconds | detail |", "|---|---|---|---|---|"]
    for outcome in outcomes:
        entry = breaks[outcome.name]
        detail = outcome.detail.splitlines()[0] if outcome.detail else ""
        lines.append(
            f"| `{outcome.name}` | `{entry.file}` | {outcome.status} "
            f"| {outcome.seconds:.0f} | {detail} |"
        )
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines += ["", f"{len(outcomes)} breaks: {summary}"]
    survivors = [o for o in outcomes if o.status == "survived"]
    for outcome in survivors:
        entry = breaks[outcome.name]
        lines.append(f"- survived `{outcome.name}`: {entry.description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/mutation_check.py",
        description=__doc__.split("\n\n", 1)[0],
    )
    parser.add_argument("--catalogue", type=Path, default=CATALOGUE)
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="the tree to break (copied first)"
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run this break (repeat)"
    )
    parser.add_argument("--list", action="store_true", help="list the breaks")
    parser.add_argument(
        "--whole-files",
        action="store_true",
        help="ignore each entry's -k: run its whole test files (slower, fairer "
        "when comparing trees whose test names differ)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the unbroken run"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per break (all tests)"
    )
    parser.add_argument(
        "--test-timeout", type=float, default=120, help="seconds per test"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    breaks = load_catalogue(args.catalogue)
    if args.only:
        unknown = set(args.only) - {b.name for b in breaks}
        if unknown:
            parser.error(f"unknown breaks: {sorted(unknown)}")
        breaks = [b for b in breaks if b.name in args.only]
    if args.list:
        for entry in breaks:
            print(f"{entry.name}: {entry.file}: {entry.description}")
            print(
                f"    tests: {' '.join(entry.tests)}"
                + (f" -k {entry.k!r}" if entry.k else "")
            )
        return 0

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as workdir:
        tree = Path(workdir) / "tree"
        copy_tree(args.tree.resolve(), tree)
        if not args.no_baseline:
            baseline(breaks, tree, args)
        for number, entry in enumerate(breaks, 1):
            outcome = check(entry, tree, args)
            outcomes.append(outcome)
            first_line = (outcome.detail.splitlines() or [""])[0]
            print(
                f"[{number}/{len(breaks)}] {entry.name}: {outcome.status} "
                f"({outcome.seconds:.0f} s) {first_line}",
                flush=True,
            )
    by_name = {b.name: b for b in breaks}
    print()
    print(report(outcomes, by_name))
    if args.json:
        args.json.write_text(
            json.dumps([vars(o) for o in outcomes], indent=2, default=str) + "\n"
        )
    bad = [o for o in outcomes if o.status in {"survived", "error"}]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
