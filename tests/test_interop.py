"""gRPC's interop test cases, every way round: our client and grpcio's against our server,
our client against grpcio's server, and the compressed-flag cases read off the wire.

The service is ``examples/interop`` (the standard ``grpc.testing.TestService``); its cases
follow gRPC's interop test descriptions. The grpcio peers are in ``tests/interop_grpcio.py``.
"""

from __future__ import annotations

import grpc
import pytest

from app_kit import Channel
from examples.interop.client import CASES, STANDARD_CASES
from examples.interop.server import TestService as InteropService

from .conftest import running_server
from .interop_grpcio import GRPCIO_CASES, grpcio_interop_server
from .relay import segmenting_relay

pytestmark = pytest.mark.anyio

# grpcio's server cannot see a message's compressed flag: the probe is left out against it.
AGAINST_GRPCIO = [
    name
    for name in (n.replace("client_compressed_unary", "client_compressed_unary_noprobe") for n in STANDARD_CASES)
    if name != "client_compressed_streaming"
] + ["client_compressed_streaming_noprobe"]


@pytest.mark.parametrize("attempt", range(3))
async def test_our_client_against_our_server(attempt: int) -> None:
    async with running_server([InteropService()]) as (_, target):
        host, port = target.rsplit(":", 1)
        async with Channel(host, int(port)) as channel:
            for name in STANDARD_CASES:
                await CASES[name](channel)


async def test_our_client_against_our_server_through_a_relay() -> None:
    async with running_server([InteropService()]) as (_, target):
        async with segmenting_relay("127.0.0.1", int(target.rsplit(":", 1)[1])) as port:
            async with Channel("127.0.0.1", port) as channel:
                for name in STANDARD_CASES:
                    await CASES[name](channel)


@pytest.mark.parametrize("attempt", range(3))
async def test_our_client_against_grpcio(attempt: int) -> None:
    async with grpcio_interop_server() as port, Channel("127.0.0.1", port) as channel:
        for name in AGAINST_GRPCIO:
            await CASES[name](channel)


@pytest.mark.parametrize("name", sorted(GRPCIO_CASES))
async def test_grpcio_client_against_our_server(name: str) -> None:
    async with running_server([InteropService()]) as (_, target):
        async with grpc.aio.insecure_channel(target) as channel:
            await GRPCIO_CASES[name](channel)
