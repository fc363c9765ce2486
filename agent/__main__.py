"""`python -m agent [--flag=value ...]`: run one agent in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
from pathlib import Path

from agent import internals
from agent.config import Config, ConfigError, load_config
from agent.errors import Code
from agent.logs import setup_logging
from agent.workers import RUN_DIR, Supervisor, WorkerSlot, available_cpus

log = logging.getLogger(__name__)


async def wait_for_certificate(config: Config, stop: asyncio.Event) -> bool:
    """MTLS_CERT_RETRY_INTERVAL: block until the mTLS certificate and key exist, as the Go agent does (the
    files are often written by another container after start). False when stopped while waiting."""
    files = [Path(config.mtls_cert), Path(config.mtls_key)]
    while not all(path.is_file() for path in files):
        log.info("waiting for the mTLS certificate and key (%s, %s), next look in %gs", *files,
                 config.mtls_cert_retry_interval)
        try:
            await asyncio.wait_for(stop.wait(), config.mtls_cert_retry_interval)
            return False
        except TimeoutError:
            continue
    return True


def raise_fd_limit() -> None:
    """Soft descriptor limit up to the hard one, as Go's runtime does at start: every client, peer and engine
    stream holds a descriptor, and the soft default (often 1024) is an easy target."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def internals_found() -> bool:
    """The library internals the agent relies on are all there (one line for each that is not); a version
    other than the verified ones only warns."""
    gone = internals.missing()
    versions = internals.running_versions()
    running = ", ".join(f"{name} {v}" for name, v in versions.items())
    for item in gone:
        log.error("%s %s is gone (running %s; verified with %s)", Code.INTERNALS_CHANGED.value, item, running,
                  ", ".join(f"{name} {v}" for name, v in internals.VERIFIED.items()))
    if not gone:
        for item in internals.unverified(versions):
            log.warning("%s %s: every internal the agent relies on was found", Code.INTERNALS_UNVERIFIED.value,
                        item)
    return not gone


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv=sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"CONFIG_INVALID {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_mode)
    if not internals_found():
        return 1
    raise_fd_limit()
    for name in config.ignored:
        log.warning("CONFIG_IGNORED %s is set but has no effect in Keelson (see the README)", name)

    count = 1 if config.edge else (config.workers or available_cpus())
    if config.edge and config.workers > 1:
        log.warning("KEELSON_WORKERS=%d ignored: an Edge agent runs one worker process", config.workers)
    if count == 1:
        return serve(config, None)
    supervisor = Supervisor(count, lambda slot: serve(config, slot), config.data_path / RUN_DIR)
    metrics_dir = supervisor.run_dir / "metrics"
    metrics_dir.mkdir()
    # Before prometheus_client is imported: it picks its multiprocess value store at import time.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    import agent.runtime  # noqa: F401  (imported once here, so that the forked workers share its pages)

    gc.freeze()  # objects made so far stay out of the collector's way, and their pages shared after fork
    return supervisor.run()


def serve(config: Config, slot: WorkerSlot | None) -> int:
    """One agent process (or one worker of several) until SIGINT/SIGTERM."""
    from agent.runtime import run

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if config.mtls_cert and config.mtls_cert_retry_interval > 0:
            if not await wait_for_certificate(config, stop):
                return 0
        return await run(config, stop, slot)

    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
