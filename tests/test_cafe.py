"""The cafe example: its service in-process and its server as a real process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from examples.cafe import cafe_pb2
from examples.cafe.service import CoffeeMachine

from .conftest import running_server

pytestmark = pytest.mark.anyio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def methods(channel: grpc.aio.Channel) -> dict[str, object]:
    p = "/cafe.CoffeeMachine/"
    return {
        "MakeLatte": channel.unary_unary(
            p + "MakeLatte", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.Latte.FromString
        ),
        "Brew": channel.unary_stream(p + "Brew", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.BrewStatus.FromString),
        "OrderRound": channel.stream_unary(
            p + "OrderRound", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.OrderSummary.FromString
        ),
        "Taste": channel.stream_stream(
            p + "Taste", cafe_pb2.TastingNote.SerializeToString, cafe_pb2.TastingNote.FromString
        ),
    }


async def test_cafe_service() -> None:
    async with running_server([CoffeeMachine()]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        m = methods(channel)
        latte = await m["MakeLatte"](cafe_pb2.LatteOrder(milk_ml=200, shots=2, syrup="vanilla", name="Ann"))
        assert latte.description == "2-shot latte, 200 ml milk with vanilla syrup for Ann"
        assert latte.order_id == 1

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await m["MakeLatte"](cafe_pb2.LatteOrder(milk_ml=10, shots=9))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(info.value)
        bad_request = error_details_pb2.BadRequest()
        status.details[0].Unpack(bad_request)
        assert [v.field for v in bad_request.field_violations] == ["milk_ml", "shots"]

        stages = [s.stage async for s in m["Brew"](cafe_pb2.LatteOrder(milk_ml=200, shots=1))]
        assert stages[-1] == cafe_pb2.BrewStatus.DONE and len(stages) == 5

        summary = await m["OrderRound"](iter([cafe_pb2.LatteOrder(milk_ml=200, shots=n) for n in (1, 2, 3)]))
        assert (summary.drinks, summary.total_shots, len(summary.order_ids)) == (3, 6, 3)

        notes = [n.text async for n in m["Taste"](iter([cafe_pb2.TastingNote(text=t) for t in ("nutty", "sweet")]))]
        assert notes == ["agreed: nutty", "agreed: sweet"]


async def test_cafe_server_process() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "examples.cafe.server",
        "--port",
        "0",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 10)).decode()
        port = int(re.search(r"'127\.0\.0\.1', (\d+)", line).group(1))  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            latte = await methods(channel)["MakeLatte"](cafe_pb2.LatteOrder(milk_ml=300, shots=1))
            assert latte.description.startswith("1-shot latte")
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_readme_client_script_against_the_app_process() -> None:
    from .process import AppProcess

    async with AppProcess("examples.cafe.app:app", "--port", "0", env={"CAFE_BREW_STEP": "0"}) as app:
        port = await app.ready()
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.cafe.client",
            "--port",
            str(port),
            "--name",
            "Ann",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        output = (await asyncio.wait_for(client.communicate(), 15))[0].decode()
        assert client.returncode == 0, output
        assert "order #1: 2-shot latte, 200 ml milk for Ann, 65 °C" in output
        assert "DONE" in output
        refused = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.cafe.client",
            "--port",
            str(port),
            "--shots",
            "9",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        output = (await asyncio.wait_for(refused.communicate(), 15))[0].decode()
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in output and "shots" in output
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
