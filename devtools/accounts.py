"""Running PostgreSQL as an unprivileged account when we are root, and the permissions that
account needs on the data directory, its parents and pip-installed binaries."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.errors import ServiceError

logger = logging.getLogger(__name__)

FALLBACK_SYSTEM_USER = "conveyor"


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int

    @property
    def switches_user(self) -> bool:
        return self.uid != os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        if not self.switches_user:
            return {}
        # extra_groups=[] drops root's supplementary groups (including gid 0).
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


_user_lock = threading.Lock()


def postgres_run_as() -> RunAs:
    """The account initdb/postgres run under: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    with _user_lock:
        for name in ("postgres", FALLBACK_SYSTEM_USER):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
        useradd = shutil.which("useradd")
        if useradd is None:
            raise ServiceError(
                f"Running as root and no 'postgres' user exists; cannot create "
                f"'{FALLBACK_SYSTEM_USER}' because useradd is not installed"
            )
        cmd = [
            useradd,
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_SYSTEM_USER,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:
            # Re-check rather than trusting the exit code: a parallel test worker
            # may have created the user between our lookup and useradd.
            entry = pwd.getpwnam(FALLBACK_SYSTEM_USER)
        except KeyError:
            raise ServiceError(
                f"useradd {FALLBACK_SYSTEM_USER} failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            ) from None
        logger.info("Created system user %r to run PostgreSQL (we are root)", entry.pw_name)
        return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def ensure_traversable(path: Path, uid: int) -> None:
    """Add o+x to ``path`` and its ancestors where ``uid`` could not pass through.

    Typical offenders are /root-like homes and pytest's 0700 /tmp/pytest-of-root.
    Only the execute bit is added so directory listings stay private.
    """
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid or st.st_mode & stat.S_IXOTH:
            continue
        directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        logger.info("Made %s traversable (o+x) for uid %d", directory, uid)


_readable_trees_done: set[Path] = set()


def ensure_world_readable_tree(root: Path) -> None:
    """Make an installed tree usable by another account (restrictive umask at pip time)."""
    if root in _readable_trees_done:
        return
    read = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
    for dirpath, _dirnames, filenames in os.walk(root):
        paths = [(Path(dirpath), True)] + [(Path(dirpath) / f, False) for f in filenames]
        for path, is_dir in paths:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            wanted = mode | read
            if is_dir or mode & stat.S_IXUSR:
                wanted |= execute
            if wanted != mode:
                path.chmod(wanted)
    _readable_trees_done.add(root)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    # Fast path: once the top is ours, everything below was created by that
    # account (initdb/postgres), so there is no need to walk a large cluster.
    if root.stat().st_uid == uid:
        return
    logger.debug("Changing ownership of %s to uid %d", root, uid)
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)
