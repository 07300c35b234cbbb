"""Re-pin requirements.txt and requirements-dev.txt from their .in files.

Resolves each ``.in`` with ``pip install --dry-run --report`` (nothing is
installed) and writes every resolved package as ``name==version``.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pin(source: Path, target: Path) -> None:
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                "-r",
                str(source),
                "--report",
                report.name,
            ],
            check=True,
        )
        resolved = json.loads(Path(report.name).read_text())["install"]
    pins = sorted(
        (item["metadata"]["name"].lower(), item["metadata"]["version"])
        for item in resolved
    )
    lines = [f"# Pinned from {source.name} by scripts/lock.py (make lock)."]
    lines += [f"{name}=={version}" for name, version in pins]
    target.write_text("\n".join(lines) + "\n")
    print(f"wrote {target.name}: {len(pins)} packages")


if __name__ == "__main__":
    for name in ("requirements", "requirements-dev"):
        pin(ROOT / f"{name}.in", ROOT / f"{name}.txt")
