"""Two small services, as two teams would run them: Inventory and Pricing.

``python -m examples.fanout.backends --inventory-port 50061 --pricing-port 50062`` serves
both, each on its own server, as if on two hosts.
"""

from __future__ import annotations

import argparse
import asyncio

from app_kit import GRPCError, Server, Status, Stream, graceful_exit

from .fanout_grpc import InventoryBase, PricingBase
from .fanout_pb2 import Item, Price, Stock

CATALOGUE = {"mug": (12, 950), "beans": (40, 1450), "grinder": (0, 8900)}  # sku: (stock, cents)


class InventoryService(InventoryBase):
    """How many of each item are in stock."""

    async def GetStock(self, stream: Stream[Item, Stock]) -> None:
        """The stock of one item, or NOT_FOUND."""
        item = await stream.recv_message()
        assert item is not None
        if item.sku not in CATALOGUE:
            raise GRPCError(Status.NOT_FOUND, f"unknown sku {item.sku!r}")
        await stream.send_message(Stock(sku=item.sku, available=CATALOGUE[item.sku][0]))


class PricingService(PricingBase):
    """What each item costs; ``delay`` makes it a slow backend."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    async def GetPrice(self, stream: Stream[Item, Price]) -> None:
        """The price of one item, or NOT_FOUND."""
        item = await stream.recv_message()
        assert item is not None
        await asyncio.sleep(self.delay)
        if item.sku not in CATALOGUE:
            raise GRPCError(Status.NOT_FOUND, f"unknown sku {item.sku!r}")
        await stream.send_message(Price(sku=item.sku, cents=CATALOGUE[item.sku][1]))


async def serve(inventory_port: int, pricing_port: int) -> None:
    """Both services, each on its own server, until SIGINT/SIGTERM."""
    inventory, pricing = Server([InventoryService()]), Server([PricingService()])
    with graceful_exit([inventory, pricing]):
        await inventory.start("127.0.0.1", inventory_port)
        await pricing.start("127.0.0.1", pricing_port)
        print(f"inventory on {inventory_port}, pricing on {pricing_port}", flush=True)
        await asyncio.gather(inventory.wait_closed(), pricing.wait_closed())


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inventory-port", type=int, default=50061)
    parser.add_argument("--pricing-port", type=int, default=50062)
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.inventory_port, arguments.pricing_port))


if __name__ == "__main__":
    main()
