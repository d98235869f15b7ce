"""A client that fans out: one quote asks Inventory and Pricing at once, under one deadline.

``python -m examples.fanout.client mug [--inventory 127.0.0.1:50061] [--pricing 127.0.0.1:50062]``
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

from app_kit import Channel, Deadline, GRPCError

from .fanout_grpc import InventoryStub, PricingStub
from .fanout_pb2 import Item


@dataclasses.dataclass(frozen=True)
class Quote:
    """What the shop can say about an item."""

    sku: str
    available: int
    cents: int


async def quote(inventory: InventoryStub, pricing: PricingStub, sku: str, *, timeout: float = 1.0) -> Quote:
    """Ask both services concurrently; both calls share one deadline.

    If either fails, the other is cancelled (its server sees the cancellation) and the
    failure is raised as it came, a :class:`GRPCError`.
    """
    deadline = Deadline.from_timeout(timeout)
    item = Item(sku=sku)
    try:
        async with asyncio.TaskGroup() as group:
            stock = group.create_task(inventory.GetStock(item, deadline=deadline))
            price = group.create_task(pricing.GetPrice(item, deadline=deadline))
    except* GRPCError as errors:
        raise errors.exceptions[0] from None
    return Quote(sku, stock.result().available, price.result().cents)


async def run(sku: str, inventory_target: str, pricing_target: str) -> None:
    """One channel per service (they may live on different hosts), one quote."""
    async with Channel(inventory_target) as inventory, Channel(pricing_target) as pricing:
        result = await quote(InventoryStub(inventory), PricingStub(pricing), sku)
    print(f"{result.sku}: {result.available} in stock at {result.cents / 100:.2f}")


def main() -> None:
    """Parse arguments and ask."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sku")
    parser.add_argument("--inventory", default="127.0.0.1:50061")
    parser.add_argument("--pricing", default="127.0.0.1:50062")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.sku, arguments.inventory, arguments.pricing))


if __name__ == "__main__":
    main()
