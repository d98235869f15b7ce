"""Order a latte from a running cafe: ``python -m examples.cafe.client [--port 50051]``."""

from __future__ import annotations

import argparse
import asyncio

from app_kit import Channel, GRPCError

from .cafe_grpc import CoffeeMachineStub
from .cafe_pb2 import BrewStatus, LatteOrder


async def order(host: str, port: int, shots: int, milk_ml: int, name: str) -> int:
    """Make a latte, then brew one watching every stage; return an exit code."""
    async with Channel(host, port) as channel:
        stub = CoffeeMachineStub(channel)
        request = LatteOrder(shots=shots, milk_ml=milk_ml, name=name)
        try:
            latte = await stub.MakeLatte(request, timeout=5)
        except GRPCError as error:
            print(f"order refused: {error}")
            for detail in error.details or []:
                print(f"  {detail}".rstrip())
            return 1
        print(f"order #{latte.order_id}: {latte.description}, {latte.temperature_c} °C")
        async with stub.Brew.open(timeout=10) as stream:
            await stream.send_message(request, end=True)
            async for status in stream:
                print(f"  {BrewStatus.Stage.Name(status.stage):<10} {status.progress_percent:3d} %")
    return 0


def main() -> None:
    """Parse arguments and order."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--milk-ml", type=int, default=200)
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(order(args.host, args.port, args.shots, args.milk_ml, args.name)))


if __name__ == "__main__":
    main()
