"""Serve the cafe example with a bare Server: ``python -m examples.cafe.server [--port N]``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from app_kit import Server

from .service import CoffeeMachine


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    server = Server([CoffeeMachine()])
    await server.start(host, port)
    logging.info("serving CoffeeMachine on %s", [s.getsockname() for s in server.sockets])
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
        await server.wait_closed()


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
