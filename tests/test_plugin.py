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
    assert len(fresh) == 3 * 3 + 3 + 3 * 2 + 1  # own protos, cafe, interop (three files, one service)
    for relative in fresh:
        assert (tmp_path / relative).read_text() == (ROOT / relative).read_text(), (
            f"{relative} is stale: run python tools/generate_protos.py"
        )


def test_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'protoc-gen-app_kit = "app_kit.plugin.main:main"' in text
    assert os.access(ROOT / "app_kit/plugin/main.py", os.R_OK)
