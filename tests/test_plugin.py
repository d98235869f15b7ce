"""protoc-gen-app_kit: generated code for packages, imports, nesting, streaming, proto3 optional."""

from __future__ import annotations

import inspect
import os
import pathlib
import sys

import grpc
import pytest

from app_kit import Cardinality, Stream

from .conftest import running_server
from .protogen import generate_into

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with generate_into(tmp_path_factory.mktemp("gen")) as modules:
        yield modules


def test_generated_bases(generated) -> None:  # type: ignore[no-untyped-def]
    billing, pb2, types = generated["billing"], generated["billing_pb2"], generated["types_pb2"]
    assert not (generated["dir"] / "acme/common/types_grpc.py").exists()  # no services, no file
    assert billing.BillingBase.__abstractmethods__ == {"Charge", "Watch", "Upload", "History"}
    assert billing.BillingBase.__doc__ == "Charges money."
    assert billing.BillingBase.Charge.__doc__ == "Charge once."
    assert inspect.iscoroutinefunction(billing.BillingBase.Charge)

    class Billing(billing.BillingBase):
        Charge = Watch = Upload = History = None  # type: ignore[assignment]

    mapping = Billing().__mapping__()
    assert {path: (h.cardinality, h.request_type, h.reply_type) for path, h in mapping.items()} == {
        "/acme.billing.Billing/Charge": (Cardinality.UNARY_UNARY, types.Money, pb2.Receipt),
        "/acme.billing.Billing/Watch": (Cardinality.STREAM_STREAM, types.Money.Detail, pb2.Receipt),
        "/acme.billing.Billing/Upload": (Cardinality.STREAM_UNARY, types.Money, pb2.Receipt),
        "/acme.billing.Billing/History": (Cardinality.UNARY_STREAM, pb2.Receipt, types.Money),
    }
    assert list(billing.AuditBase.__abstractmethods__) == ["Log"]
    assert hasattr(billing, "BillingStub") and hasattr(billing, "AuditStub")


@pytest.mark.anyio
async def test_generated_service_is_served_and_proto3_optional_survives(generated) -> None:  # type: ignore[no-untyped-def]
    nopkg, pb2 = generated["nopkg"], generated["nopkg_pb2"]

    class Pinger(nopkg.PingerBase):
        async def Ping(self, stream: Stream) -> None:  # type: ignore[type-arg]
            request = await stream.recv_message()
            reply = pb2.Pong(n=request.n + 1) if request.HasField("n") else pb2.Pong()
            await stream.send_message(reply)

    assert list(Pinger().__mapping__()) == ["/Pinger/Ping"]
    async with running_server([Pinger()]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        ping = channel.unary_unary("/Pinger/Ping", pb2.Pong.SerializeToString, pb2.Pong.FromString)
        assert (await ping(pb2.Pong(n=0))).HasField("n")
        assert (await ping(pb2.Pong(n=0))).n == 1
        assert not (await ping(pb2.Pong())).HasField("n")


def test_generated_code_is_up_to_date(tmp_path: pathlib.Path) -> None:
    """The committed generated code (app_kit's own protos, the examples) matches a fresh run."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import generate_protos
    finally:
        sys.path.remove(str(ROOT / "tools"))
    generate_protos.generate(ROOT, tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in (".py", ".pyi"))
    assert len(fresh) == 3 * 3 + 3 + 3 * 2 + 1 + 3 * 3  # own protos, cafe, interop (3 files, 1 service), 3 more
    for relative in fresh:
        assert (tmp_path / relative).read_text() == (ROOT / relative).read_text(), (
            f"{relative} is stale: run python tools/generate_protos.py"
        )


def test_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'protoc-gen-app_kit = "app_kit.plugin.main:main"' in text
    assert os.access(ROOT / "app_kit/plugin/main.py", os.R_OK)


@pytest.mark.anyio
async def test_reflection_finds_a_service_whose_file_defines_no_messages(generated) -> None:  # type: ignore[no-untyped-def]
    # Only clock_grpc was imported: its import of its own clock_pb2 is what lets reflection
    # (here grpcio's reflection client) find the service and the file that declares it.
    import anyio
    import grpc
    from google.protobuf import descriptor_pool
    from google.protobuf.timestamp_pb2 import Timestamp
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from app_kit.services.reflection import Reflection

    from .conftest import running_server

    class Clock(generated["clock"].ClockBase):
        async def Now(self, stream):  # type: ignore[no-untyped-def]
            await stream.recv_message()
            await stream.send_message(Timestamp(seconds=1))

    assert descriptor_pool.Default().FindServiceByName("acme.clock.v1.Clock").file.name == "acme/clock/v1/clock.proto"
    async with running_server([Clock(), *Reflection.for_services([Clock()])]) as (_, target):

        def reflect() -> tuple[list[str], str, list[str]]:
            with grpc.insecure_channel(target) as channel:
                database = ProtoReflectionDescriptorDatabase(channel)
                found = database.FindFileContainingSymbol("acme.clock.v1.Clock")
                pool = descriptor_pool.DescriptorPool(database)
                method = pool.FindServiceByName("acme.clock.v1.Clock").methods_by_name["Now"]
                return (
                    list(database.get_services()),
                    found.name,
                    [method.input_type.full_name, method.output_type.full_name],
                )

        services, file_name, types = await anyio.to_thread.run_sync(reflect)
    assert "acme.clock.v1.Clock" in services
    assert file_name == "acme/clock/v1/clock.proto"
    assert types == ["google.protobuf.Empty", "google.protobuf.Timestamp"]
