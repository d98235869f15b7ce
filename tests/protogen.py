"""Generate Python code from test protos with grpc_tools and our plugin, and import it."""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

PROTOS = {
    "acme/common/types.proto": """
        syntax = "proto3";
        package acme.common;
        import "google/protobuf/descriptor.proto";
        extend google.protobuf.MessageOptions { string billing_tag = 50001; }
        message Money {
          option (billing_tag) = "money";
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
    "acme/clock/v1/clock.proto": """
        syntax = "proto3";
        package acme.clock.v1;
        import "google/protobuf/empty.proto";
        import "google/protobuf/timestamp.proto";
        // No messages of its own: only the service is in this file.
        service Clock { rpc Now(google.protobuf.Empty) returns (google.protobuf.Timestamp); }
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


@contextlib.contextmanager
def generate_into(tmp: pathlib.Path) -> Iterator[dict[str, Any]]:
    """Write PROTOS under ``tmp``, generate their code, and import it (on sys.path meanwhile)."""
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
            "clock": importlib.import_module("acme.clock.v1.clock_grpc"),  # only the _grpc module
            "nopkg_pb2": importlib.import_module("nopkg_pb2"),
            "dir": tmp,
        }
    finally:
        sys.path.remove(str(tmp))
