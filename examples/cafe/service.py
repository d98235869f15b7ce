"""The CoffeeMachine service of the cafe example."""

from __future__ import annotations

from typing import Protocol

import anyio
from google.rpc import error_details_pb2

from app_kit import GRPCError, Status, Stream

from .cafe_grpc import CoffeeMachineBase
from .cafe_pb2 import BrewStatus, Latte, LatteOrder, OrderSummary, TastingNote


def check_order(order: LatteOrder) -> None:
    """Reject an impossible order with INVALID_ARGUMENT and a BadRequest detail per field."""
    violations = []
    if not 150 <= order.milk_ml <= 400:
        violations.append(("milk_ml", "must be from 150 to 400"))
    if not 1 <= order.shots <= 4:
        violations.append(("shots", "must be from 1 to 4"))
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=text) for field, text in violations
            ]
        )
        raise GRPCError(Status.INVALID_ARGUMENT, "impossible latte order", [bad_request])


def describe(order: LatteOrder) -> str:
    """What goes on the cup."""
    syrup = f" with {order.syrup} syrup" if order.HasField("syrup") else ""
    who = f" for {order.name}" if order.name else ""
    return f"{order.shots}-shot latte, {order.milk_ml} ml milk{syrup}{who}"


class Orders(Protocol):
    """Where orders are recorded (an :class:`~examples.cafe.store.OrderStore`, or memory)."""

    async def add(self, description: str) -> int:
        """Record an order; return its number."""
        ...


class CoffeeMachine(CoffeeMachineBase):
    """Makes lattes and records them in ``orders``; each brewing stage takes ``brew_step`` s."""

    def __init__(self, orders: Orders | None = None, brew_step: float = 0.0) -> None:
        from .store import MemoryOrders

        self._orders: Orders = orders if orders is not None else MemoryOrders()
        self._brew_step = brew_step

    async def MakeLatte(self, stream: Stream[LatteOrder, Latte]) -> None:
        """Make one latte."""
        order = await stream.recv_message()
        assert order is not None
        check_order(order)
        description = describe(order)
        order_id = await self._orders.add(description)
        await stream.send_message(Latte(description=description, temperature_c=65, order_id=order_id))

    async def Brew(self, stream: Stream[LatteOrder, BrewStatus]) -> None:
        """Brew a latte, reporting each stage."""
        order = await stream.recv_message()
        assert order is not None
        check_order(order)
        stages = [BrewStatus.GRINDING, BrewStatus.EXTRACTING, BrewStatus.STEAMING, BrewStatus.POURING, BrewStatus.DONE]
        for index, stage in enumerate(stages, 1):
            await anyio.sleep(self._brew_step)
            await stream.send_message(BrewStatus(stage=stage, progress_percent=index * 100 // len(stages)))

    async def OrderRound(self, stream: Stream[LatteOrder, OrderSummary]) -> None:
        """Take a round of orders, then make them all."""
        summary = OrderSummary()
        async for order in stream:
            check_order(order)
            summary.drinks += 1
            summary.total_shots += order.shots
            summary.order_ids.append(await self._orders.add(describe(order)))
        await stream.send_message(summary)

    async def Taste(self, stream: Stream[TastingNote, TastingNote]) -> None:
        """Answer every tasting note."""
        async for note in stream:
            await stream.send_message(TastingNote(text=f"agreed: {note.text}"))
