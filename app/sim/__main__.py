"""CLI: `python -m app.sim --host 127.0.0.1 --port 8100 [--ttft S] [--tps N] [--faults SPEC]`.

Flags win over the environment (SIM_TTFT, SIM_TPS, SIM_FAULTS, SIM_SEED, SIM_RETRY_AFTER,
SIM_STEP_TIME), which wins over the built-in defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Mapping, Sequence

from aiohttp import web

from app.sim.config import (
    DEFAULT_RETRY_AFTER,
    DEFAULT_STEP_TIME,
    DEFAULT_TPS,
    DEFAULT_TTFT,
    SimConfig,
)
from app.sim.faults import FaultRates, FaultSpecError
from app.sim.server import make_app

log = logging.getLogger("app.sim")

# Room for a thousand clients connecting at once without refused connections.
LISTEN_BACKLOG = 2048
# Hanging requests never finish by themselves; don't let them hold up shutdown.
SHUTDOWN_TIMEOUT = 0.25
PARENT_POLL_SECONDS = 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.sim",
        description="OpenAI-compatible model simulator (chat and images) and ComfyUI simulator",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    parser.add_argument(
        "--ttft", type=float, help=f"time to first token, s (default {DEFAULT_TTFT})"
    )
    parser.add_argument(
        "--tps", type=float, help=f"tokens per second, 0 = no delay ({DEFAULT_TPS:g})"
    )
    parser.add_argument("--faults", help='random fault rates, e.g. "429=0.05,500=0.02,drop=0.01"')
    parser.add_argument("--seed", type=int, help="seed of the random fault draws")
    parser.add_argument(
        "--retry-after", type=float, help=f"Retry-After of 429 faults, s ({DEFAULT_RETRY_AFTER:g})"
    )
    parser.add_argument(
        "--step-time",
        type=float,
        help=f"seconds per sampling step of a ComfyUI prompt ({DEFAULT_STEP_TIME:g})",
    )
    parser.add_argument(
        "--rpm",
        type=int,
        help="answer 429 (with Retry-After) past this many requests per --rpm-period, "
        "any model (SIM_RPM)",
    )
    parser.add_argument(
        "--rpm-period", type=float, help="the --rpm window, seconds (SIM_RPM_PERIOD, 60)"
    )
    parser.add_argument(
        "--exit-with-parent",
        type=int,
        metavar="PID",
        help="exit when process PID is no longer our parent (used by SimulatorProcess)",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def _number(flag: float | None, env: Mapping[str, str], name: str, default: float) -> float:
    if flag is not None:
        return flag
    raw = env.get(name, "").strip()
    return float(raw) if raw else default


def config_from(args: argparse.Namespace, env: Mapping[str, str]) -> SimConfig:
    faults = args.faults if args.faults is not None else env.get("SIM_FAULTS", "")
    seed = args.seed if args.seed is not None else env.get("SIM_SEED", "").strip() or None
    return SimConfig(
        ttft=_number(args.ttft, env, "SIM_TTFT", DEFAULT_TTFT),
        tps=_number(args.tps, env, "SIM_TPS", DEFAULT_TPS),
        faults=FaultRates.parse(faults),
        retry_after=_number(args.retry_after, env, "SIM_RETRY_AFTER", DEFAULT_RETRY_AFTER),
        step_time=_number(args.step_time, env, "SIM_STEP_TIME", DEFAULT_STEP_TIME),
        seed=int(seed) if seed is not None else None,
        rate_limits=_rate_limits(args, env),
    )


def _rate_limits(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, tuple[int, float]]:
    rpm = args.rpm if args.rpm is not None else int(env.get("SIM_RPM", "").strip() or 0)
    if rpm < 0:
        raise ValueError("--rpm must be >= 0")
    period = _number(args.rpm_period, env, "SIM_RPM_PERIOD", 60.0)
    if period <= 0:
        raise ValueError("--rpm-period must be > 0")
    return {"*": (rpm, period)} if rpm else {}


def raise_open_file_limit() -> None:
    """Each concurrent stream is a socket; the common soft limit of 1024 is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # Re-parenting means our parent died: a test run that crashed must not leave us behind.
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_SECONDS)
    log.info("parent %d is gone, stopping", parent_pid)
    stop.set()


async def serve(args: argparse.Namespace, config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    runner = web.AppRunner(
        make_app(config),
        access_log=None,  # one line per request costs more CPU than a streamed answer
        handler_cancellation=True,  # lets a stream notice at once that its client left
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=LISTEN_BACKLOG, reuse_address=True)
    await site.start()
    host, port = runner.addresses[0][:2]
    log.info("simulator listening on http://%s:%d/v1", host, port)
    log.info("run config: %s", config.as_dict())

    watcher = None
    if args.exit_with_parent is not None:
        watcher = asyncio.create_task(watch_parent(args.exit_with_parent, stop))
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()
    log.info("simulator stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from(args, os.environ)
    except (FaultSpecError, ValueError) as error:
        log.error("bad simulator settings: %s", error)
        return 2
    raise_open_file_limit()
    asyncio.run(serve(args, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
