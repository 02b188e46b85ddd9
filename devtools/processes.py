"""Ports, /proc and log files: what the servers, tests and benchmarks read about processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

_LOG_TAIL_LINES = 40


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is unused right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; None if unavailable.

    Index 0 is the state, 1 the parent pid, 11/12 utime/stime, 19 the start time.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) is parenthesised and may contain spaces; split after it.
    return raw[raw.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running (non-zombie) process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = proc_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> str:
    fields = proc_stat(pid)
    # Field 22 (starttime) disambiguates a reused pid; "" where /proc is missing.
    return fields[19] if fields and len(fields) > 19 else ""


def is_process_named(pid: int, prefixes: tuple[str, ...]) -> bool:
    if not pid_alive(pid):
        return False
    name = process_name(pid)
    # Without /proc (non-Linux) we cannot tell; assume the pid is still ours.
    return name is None or name.startswith(prefixes)


def read_pid_file(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0].strip()
        # postmaster.pid holds -pid for a single-user backend.
        return abs(int(first))
    except (OSError, IndexError, ValueError):
        return None


def log_tail(path: Path | None, lines: int = _LOG_TAIL_LINES, since: int = 0) -> str:
    """Last ``lines`` lines of a log, ignoring what was there before offset ``since``."""
    if path is None:
        return "(no log file)"
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(since, fh.tell() - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    text = "\n".join(data.decode(errors="replace").splitlines()[-lines:])
    return text or "(log is empty)"
