"""protoc-gen-app_kit: generated code for packages, imports, nesting, streaming, proto3 optional."""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import subprocess
import sys
import textwrap

import grpc
import pytest

from app_kit import Cardinality, Stream

from .conftest import running_server

ROOT = pathlib.Path(__file__).resolve().parent.parent

PROTOS = {
    "acme/common/types.proto": """
        syntax = "proto3";
        package acme.common;
        message Money {
          int64 units = 1;
          optional string currency = 2;
          message Detail { string note = 1; }
        }
    """,
    "acme/billing/billing-api.proto": """
        syntax = "proto3";
        package acme.billing;
        import "acme/common/types.proto";
        message Receipt { string id = 1; acme.common.Money.Detail detail = 2; }
        // Charges money.
        service Billing {
          // Charge once.
          rpc Charge(acme.common.Money) returns (Receipt);
          rpc Watch(stream acme.common.Money.Detail) returns (stream Receipt);
          rpc Upload(stream acme.common.Money) returns (Receipt);
          rpc History(Receipt) returns (stream acme.common.Money);
        }
        service Audit { rpc Log(Receipt) returns (Receipt); }
    """,
    "nopkg.proto": """
        syntax = "proto3";
        message Pong { optional int32 n = 1; }
        service Pinger { rpc Ping(Pong) returns (Pong); }
    """,
}


def protoc(tmp: pathlib.Path, include: pathlib.Path, *files: str) -> None:
    plugin = tmp / "protoc-gen-app_kit"
    plugin.write_text(f"#!{sys.executable}\nfrom app_kit.plugin.main import main\nmain()\n")
    plugin.chmod(0o755)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--plugin=protoc-gen-app_kit={plugin}",
            f"--app_kit_out={tmp}",
            *files,
        ],
        check=True,
        cwd=include,
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("gen")
    for name, text in PROTOS.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(textwrap.dedent(text))
    protoc(tmp, tmp, *PROTOS)
    sys.path.insert(0, str(tmp))
    try:
        yield {
            "billing": importlib.import_module("acme.billing.billing_api_grpc"),
            "billing_pb2": importlib.import_module("acme.billing.billing_api_pb2"),
            "types_pb2": importlib.import_module("acme.common.types_pb2"),
            "nopkg": importlib.import_module("nopkg_grpc"),
            "nopkg_pb2": importlib.import_module("nopkg_pb2"),
            "dir": tmp,
        }
    finally:
        sys.path.remove(str(tmp))


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


def test_example_code_is_up_to_date(tmp_path: pathlib.Path) -> None:
    protoc(tmp_path, ROOT, "examples/cafe/cafe.proto")
    committed = (ROOT / "examples/cafe/cafe_grpc.py").read_text()
    assert (tmp_path / "examples/cafe/cafe_grpc.py").read_text() == committed, (
        "examples/cafe/cafe_grpc.py is stale: regenerate it (see README)"
    )


def test_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'protoc-gen-app_kit = "app_kit.plugin.main:main"' in text
    assert os.access(ROOT / "app_kit/plugin/main.py", os.R_OK)
