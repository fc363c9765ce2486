"""`python -m agent`: run one agent in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from agent.config import ConfigError, load_config
from agent.logs import setup_logging
from agent.runtime import run

log = logging.getLogger("keelson")


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"CONFIG_INVALID {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_mode)

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run(config, stop)

    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
