"""What the machine is and how much memory a process tree holds (Linux /proc)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def _status_field(pid: int, name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes(pid: int) -> int | None:
    """Return a process's resident set size, or None when it is gone."""
    kib = _status_field(pid, "VmRSS:")
    return kib * 1024 if kib is not None else None


def thread_count(pid: int) -> int:
    """Return how many threads a process runs (0 when it is gone)."""
    return _status_field(pid, "Threads:") or 0


def children(pid: int) -> list[int]:
    """Return the direct children of ``pid`` (e.g. gunicorn's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) a process has used, 0 when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of stat(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """Return the CPU time used by a process and its children (gunicorn's workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def tree_rss(pid: int) -> dict:
    """Return the RSS of a process and each of its children, their total, and
    the threads they run."""
    kids = children(pid)
    master = rss_bytes(pid)
    workers = [rss_bytes(child) or 0 for child in kids]
    total = (master or 0) + sum(workers)
    threads = thread_count(pid) + sum(thread_count(child) for child in kids)
    return {"master": master, "workers": workers, "total": total, "threads": threads}


def machine() -> dict[str, object]:
    """Describe the machine: CPU model, cores, memory, kernel, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    os_name = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "kernel": platform.release(),
        "os": os_name,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def package_version(name: str) -> str | None:
    """Return an installed distribution's version in this interpreter, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def command_output(argv: list[str]) -> str | None:
    """Return a command's first line of output (stdout or stderr), or None."""
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def git_revision(directory: Path) -> str | None:
    """Return ``<commit>`` (``+dirty`` when the work tree has changes), or None."""
    commit = command_output(
        ["git", "-C", str(directory), "rev-parse", "--short", "HEAD"]
    )
    if commit is None or " " in commit:
        return None
    status = subprocess.run(
        ["git", "-C", str(directory), "status", "--porcelain", "--", "llm_service"],
        capture_output=True,
        text=True,
        check=False,
    )
    return commit + ("+dirty" if status.stdout.strip() else "")
