"""A fresh-eyes review of protoc-gen-app_kit against the .proto files a user of grpcio's codegen
writes: dotted packages and none, protos in subdirectories importing each other (``import
public`` too), names that are Python keywords or builtins or that the generated code uses
itself, method names differing only in case, two services in one file, one service name in two
packages, every cardinality, well-known types, nested messages, proto3 ``optional``, proto2 and
editions, deprecated options, comments as docstrings, a file with no services, very long names.

Every proto of the main set is generated in one protoc run, by protobuf's generators, grpcio's
plugin and ours, side by side (the keyword file, the editions file and ``import_prefix`` take a
run of their own: each may end up failing protoc). For each: the module imports, mypy --strict
passes on it (as test_typing_strict.py runs it: app_kit installed in a virtual environment), the
paths and cardinalities match those of grpcio's generated stubs, and calls over a socket work
(app_kit's client and server; grpcio's generated stubs against app_kit's server).

The nine defects it found (each a strict xfail first) are fixed: a one-line comment ending in a
quote, trailing comments, methods named abc, str, dict or a keyword, a proto under a directory
named like a parameter (channel/), a file name with a dot, editions, import_prefix on protobuf's
own types.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import subprocess
import sys
import textwrap
import venv
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from app_kit import Cardinality, Channel

from .conftest import running_server

pytestmark = pytest.mark.anyio

ROOT = pathlib.Path(__file__).resolve().parent.parent
C = Cardinality
BY_FLAGS = {(c.client_streaming, c.server_streaming): c for c in Cardinality}
LONG_PACKAGE = "s16." + "p" * 60 + ".v1"
LONG_SERVICE = "S" + "x" * 200
LONG_METHOD = "M" + "y" * 200
LONG_MESSAGE = "L" + "z" * 200

MESSAGE_M = "message M { int32 a = 1; }"

PROTOS = {
    # A dotted package, two services in one file, every cardinality, nested messages as request
    # and reply, proto3 optional, method names differing only in case, well-known types.
    "s16review/v1/everything.proto": """
        syntax = "proto3";
        package s16.deep.v1;
        import "google/protobuf/empty.proto";
        import "google/protobuf/timestamp.proto";
        import "google/protobuf/any.proto";
        import "google/protobuf/wrappers.proto";
        message Outer {
          message Inner { optional int32 n = 1; string note = 2; }
          Inner inner = 1;
          repeated Inner items = 2;
        }
        service Everything {
          rpc Unary(Outer.Inner) returns (Outer);
          rpc ServerStream(Outer.Inner) returns (stream Outer.Inner);
          rpc ClientStream(stream Outer.Inner) returns (Outer);
          rpc Bidi(stream Outer) returns (stream Outer.Inner);
          rpc Get(Outer.Inner) returns (Outer.Inner);
          rpc get(Outer.Inner) returns (Outer.Inner);
          rpc GET(Outer.Inner) returns (Outer.Inner);
        }
        service WellKnown {
          rpc Now(google.protobuf.Empty) returns (google.protobuf.Timestamp);
          rpc Pack(google.protobuf.StringValue) returns (google.protobuf.Any);
          rpc Unpack(google.protobuf.Any) returns (google.protobuf.Int64Value);
          rpc Nothing(google.protobuf.Empty) returns (stream google.protobuf.Empty);
        }
    """,
    "s16_nopkg.proto": """
        syntax = "proto3";
        import "google/protobuf/wrappers.proto";
        message S16Msg { optional bool seen = 1; }
        service S16Bare { rpc Echo(google.protobuf.BoolValue) returns (S16Msg); }
    """,
    # Subdirectories importing each other; c sees a's types only through b's `import public`.
    "s16review/sub/a/base.proto": """
        syntax = "proto3";
        package s16.base;
        message Thing { message Part { string name = 1; } Part part = 1; }
    """,
    "s16review/sub/b/reexport.proto": """
        syntax = "proto3";
        package s16.reexport;
        import public "s16review/sub/a/base.proto";
        message Wrapper { s16.base.Thing thing = 1; }
    """,
    "s16review/sub/c/user.proto": """
        syntax = "proto3";
        package s16.user;
        import "s16review/sub/b/reexport.proto";
        service UsesPublic {
          rpc Take(s16.base.Thing.Part) returns (s16.reexport.Wrapper);
          rpc Many(stream s16.reexport.Wrapper) returns (stream s16.base.Thing);
        }
    """,
    "s16review/my-dir/hyphen-file.proto": """
        syntax = "proto3";
        package s16.hyphen;
        import "s16review/sub/a/base.proto";
        service Hyphen { rpc Go(s16.base.Thing) returns (s16.base.Thing.Part); }
    """,
    # A keyword in the package, services named after keywords, methods named after builtins and after names the
    # generated code uses (its parameters and locals: self, stream, channel, method_for).
    "s16review/names.proto": f"""
        syntax = "proto3";
        package s16.import.names;
        {MESSAGE_M}
        service class {{
          rpc print(M) returns (M);
          rpc open(M) returns (stream M);
          rpc type(stream M) returns (M);
          rpc channel(stream M) returns (stream M);
          rpc self(M) returns (M);
          rpc stream(M) returns (M);
          rpc method_for(M) returns (M);
          rpc typing(M) returns (M);
        }}
        service None {{ rpc Go(M) returns (M); }}
    """,
    # Builtins the generated annotations use (`dict[str, app_kit.Handler]`) as method names.
    "s16review/shadow.proto": f"""
        syntax = "proto3";
        package s16.shadow;
        {MESSAGE_M}
        service Shadow {{ rpc str(M) returns (M); rpc dict(M) returns (M); }}
    """,
    # The module the generated base class decorates its methods with, as a method name.
    "s16review/abc_method.proto": f"""
        syntax = "proto3";
        package s16.letters;
        {MESSAGE_M}
        service Letters {{ rpc abc(M) returns (M); rpc xyz(M) returns (M); }}
    """,
    "s16review/same/one.proto": f"""
        syntax = "proto3";
        package s16.one;
        {MESSAGE_M}
        service Greeter {{ rpc Hello(M) returns (M); }}
    """,
    "s16review/same/two.proto": f"""
        syntax = "proto3";
        package s16.two;
        {MESSAGE_M}
        service Greeter {{ rpc Hello(M) returns (M); }}
    """,
    "s16review/comments.proto": f"""
        syntax = "proto3";
        package s16.comments;
        {MESSAGE_M}
        // Service doc with \"\"\"triple quotes\"\"\", a backslash \\ and C:\\new\\table,
        // non-ASCII: café ☕ 日本語 — and '''single triples'''.
        service Documented {{
          // Leading for Plain.
          rpc Plain(M) returns (M);
          /* Block comment
           * on two lines, "quoted" inside. */
          rpc Block(M) returns (M);
          // Ends in a backslash \\
          rpc Backslash(M) returns (M);
          rpc NoDoc(M) returns (M);
          rpc Trailing(M) returns (M);  // Trailing words.
        }}
    """,
    "s16review/quote_end.proto": f"""
        syntax = "proto3";
        package s16.quote;
        {MESSAGE_M}
        // Says "hi"
        service Quoted {{ rpc Go(M) returns (M); }}
    """,
    "s16review/legacy.proto": """
        syntax = "proto2";
        package s16.legacy;
        message Req { required string name = 1; optional int32 n = 2 [default = 7]; }
        service Legacy { rpc Hello(Req) returns (Req); }
    """,
    "s16review/old.proto": """
        syntax = "proto3";
        package s16.old;
        message M { option deprecated = true; int32 a = 1 [deprecated = true]; }
        service Old {
          option deprecated = true;
          rpc Gone(M) returns (M) { option deprecated = true; }
          rpc Going(stream M) returns (stream M) { option deprecated = true; option idempotency_level = IDEMPOTENT; }
        }
    """,
    "s16review/long.proto": f"""
        syntax = "proto3";
        package {LONG_PACKAGE};
        message {LONG_MESSAGE} {{ message {LONG_MESSAGE} {{ int32 a = 1; }} }}
        service {LONG_SERVICE} {{
          rpc {LONG_METHOD}({LONG_MESSAGE}.{LONG_MESSAGE}) returns (stream {LONG_MESSAGE});
        }}
    """,
    "s16review/empty_service.proto": f"""
        syntax = "proto3";
        package s16.empty;
        {MESSAGE_M}
        service Nothing {{}}
    """,
    "s16review/messages_only.proto": f"""
        syntax = "proto3";
        package s16.messages;
        {MESSAGE_M}
    """,
    # A file whose name has a dot besides the extension: protobuf writes s16review/dotted/name_pb2.py.
    "s16review/dotted.name.proto": f"""
        syntax = "proto3";
        package s16.dotted;
        {MESSAGE_M}
        service Dotted {{ rpc Go(M) returns (M); }}
    """,
    # A top-level directory named like the generated stub's constructor parameter.
    "channel/v1/s16chat.proto": """
        syntax = "proto3";
        package s16.chat.v1;
        message Line { string text = 1; }
        service Chat { rpc Say(Line) returns (Line); }
    """,
}

# Modules whose generated code is expected to be right (the others are the defects below).
CLEAN = [
    "s16review.v1.everything",
    "s16_nopkg",
    "s16review.sub.c.user",
    "s16review.my_dir.hyphen_file",
    "s16review.names",
    "s16review.same.one",
    "s16review.same.two",
    "s16review.comments",
    "s16review.legacy",
    "s16review.old",
    "s16review.long",
    "s16review.empty_service",
]


def write_protos(root: pathlib.Path, protos: dict[str, str]) -> None:
    for name, text in protos.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text), encoding="utf-8")


def protoc(
    src: pathlib.Path, out: pathlib.Path, files: list[str], *, app_kit_opt: str = "", grpcio: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run grpc_tools' protoc with protobuf's generators, ours (and grpcio's)."""
    out.mkdir(parents=True, exist_ok=True)
    plugin = out.parent / f"protoc-gen-app_kit-{out.name}"
    plugin.write_text(f"#!{sys.executable}\nfrom app_kit.plugin.main import main\nmain()\n")
    plugin.chmod(0o755)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{src}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--plugin=protoc-gen-app_kit={plugin}",
        f"--app_kit_out={app_kit_opt}{out}",
        *([f"--grpc_python_out={out}"] if grpcio else []),
        *files,
    ]
    return subprocess.run(command, cwd=src, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """The main set generated in one protoc run, its output directory on sys.path meanwhile."""
    tmp = tmp_path_factory.mktemp("plugin_review")
    write_protos(tmp / "src", PROTOS)
    result = protoc(tmp / "src", tmp / "gen", list(PROTOS), grpcio=True)
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(tmp / "gen"))
    try:
        yield tmp / "gen"
    finally:
        sys.path.remove(str(tmp / "gen"))
        for name in [name for name in sys.modules if name == "channel" or name.startswith("channel.")]:
            del sys.modules[name]  # a top-level name another test might want


def load(name: str) -> Any:
    return importlib.import_module(name)


def service_names(module: str) -> list[str]:
    return list(load(f"{module}_pb2").DESCRIPTOR.services_by_name)


def implement(base: type[Any]) -> Any:
    """A service made of a generated base: every method takes all its requests and answers with
    default replies (two on server streaming), noting how many requests each path took."""
    seen: dict[str, int] = {}

    async def answer(self: Any, stream: Any) -> None:
        handler = self.__mapping__()[stream.method]
        seen[stream.method] = len([message async for message in stream])
        for _ in range(2 if handler.cardinality.server_streaming else 1):
            await stream.send_message(handler.reply_type())

    service = type(f"Impl_{base.__name__}", (base,), dict.fromkeys(base.__abstractmethods__, answer))()
    service.seen = seen
    return service


class RecordingChannel:
    """Stands in for a grpc.Channel under grpcio's generated stubs: notes each path's cardinality."""

    def __init__(self) -> None:
        self.paths: dict[str, Cardinality] = {}

    def _record(self, path: str, cardinality: Cardinality) -> None:
        self.paths[path] = cardinality

    def unary_unary(self, path: str, **_: Any) -> None:
        self._record(path, C.UNARY_UNARY)

    def unary_stream(self, path: str, **_: Any) -> None:
        self._record(path, C.UNARY_STREAM)

    def stream_unary(self, path: str, **_: Any) -> None:
        self._record(path, C.STREAM_UNARY)

    def stream_stream(self, path: str, **_: Any) -> None:
        self._record(path, C.STREAM_STREAM)


# -- what works -----------------------------------------------------------------------------


async def test_paths_and_cardinalities_match_grpcio_generated_code(gen: pathlib.Path) -> None:
    """Every clean module imports; for every service, our base's mapping and our stub use the
    paths (``/package.Service/Method``) and cardinalities grpcio's generated stub uses."""
    checked = 0
    async with Channel("127.0.0.1:1") as channel:
        for module in CLEAN:
            ours = load(f"{module}_grpc")
            try:
                theirs = load(f"{module}_pb2_grpc")
            except SyntaxError:  # grpcio's: `class class:` for `service class`; `"""` in comments unescaped
                assert module in ("s16review.names", "s16review.comments")
                theirs = None
            for name, service in load(f"{module}_pb2").DESCRIPTOR.services_by_name.items():
                declared = {
                    f"/{service.full_name}/{m.name}": BY_FLAGS[m.client_streaming, m.server_streaming]
                    for m in service.methods
                }
                recorder = RecordingChannel()
                if theirs is not None:
                    getattr(theirs, f"{name}Stub")(recorder)
                served = {
                    path: h.cardinality for path, h in implement(getattr(ours, f"{name}Base")).__mapping__().items()
                }
                stub = getattr(ours, f"{name}Stub")(channel)
                called = {m.path: m.cardinality for m in vars(stub).values()}
                assert served == called == declared, (module, name)
                assert theirs is None or recorder.paths == declared, (module, name)
                checked += len(served)
    assert checked == 7 + 4 + 1 + 2 + 1 + 8 + 1 + 1 + 1 + 5 + 1 + 2 + 1 + 0
    everything = implement(load("s16review.v1.everything_grpc").EverythingBase).__mapping__()
    assert {p for p in everything if p.lower().endswith("/get")} == {
        "/s16.deep.v1.Everything/Get",
        "/s16.deep.v1.Everything/get",
        "/s16.deep.v1.Everything/GET",
    }
    names = implement(load("s16review.names_grpc").classBase).__mapping__()
    assert "/s16.import.names.class/print" in names and "/s16.import.names.class/channel" in names
    assert list(implement(load("s16_nopkg_grpc").S16BareBase).__mapping__()) == ["/S16Bare/Echo"]
    long_paths = list(implement(getattr(load("s16review.long_grpc"), f"{LONG_SERVICE}Base")).__mapping__())
    assert long_paths == [f"/{LONG_PACKAGE}.{LONG_SERVICE}/{LONG_METHOD}"]


def test_no_services_no_module_and_an_empty_service_is_usable(gen: pathlib.Path) -> None:
    # As documented: a file without services gets no _grpc.py (grpcio's plugin writes one anyway).
    assert not (gen / "s16review/messages_only_grpc.py").exists()
    assert (gen / "s16review/messages_only_pb2_grpc.py").exists()
    nothing = load("s16review.empty_service_grpc")
    assert nothing.NothingBase.__abstractmethods__ == frozenset()
    assert nothing.NothingBase().__mapping__() == {}


def test_comments_become_docstrings(gen: pathlib.Path) -> None:
    base = load("s16review.comments_grpc").DocumentedBase
    assert inspect.getdoc(base) == (
        'Service doc with """triple quotes""", a backslash \\ and C:\\new\\table,\n'
        "non-ASCII: café ☕ 日本語 — and '''single triples'''."
    )
    assert inspect.getdoc(base.Plain) == "Leading for Plain."
    assert inspect.getdoc(base.Block) == 'Block comment\non two lines, "quoted" inside.'
    assert inspect.getdoc(base.Backslash) == "Ends in a backslash \\"
    assert inspect.getdoc(base.NoDoc) == "/s16.comments.Documented/NoDoc"
    # Deprecated options change nothing in the code (as in grpcio's): it imports and is typed.
    assert load("s16review.old_grpc").OldBase.__abstractmethods__ == {"Gone", "Going"}


class EverythingService:
    """Built on the generated base in the test (the module is imported once the code exists)."""

    @staticmethod
    def make(everything: Any, pb2: Any) -> Any:
        Outer = pb2.Outer

        class Everything(everything.EverythingBase):
            async def Unary(self, stream: Any) -> None:
                request = await stream.recv_message()
                await stream.send_message(Outer(inner=request, items=[request, request]))

            async def ServerStream(self, stream: Any) -> None:
                request = await stream.recv_message()
                if not request.HasField("n"):
                    await stream.send_message(Outer.Inner(note="no n"))
                    return
                for i in range(request.n):
                    await stream.send_message(Outer.Inner(n=i, note=request.note))

            async def ClientStream(self, stream: Any) -> None:
                await stream.send_message(Outer(items=[item async for item in stream]))

            async def Bidi(self, stream: Any) -> None:
                async for outer in stream:
                    await stream.send_message(outer.inner)

            async def Get(self, stream: Any) -> None:
                await stream.recv_message()
                await stream.send_message(Outer.Inner(note="Get"))

            async def get(self, stream: Any) -> None:
                await stream.recv_message()
                await stream.send_message(Outer.Inner(note="get"))

            async def GET(self, stream: Any) -> None:
                await stream.recv_message()
                await stream.send_message(Outer.Inner(note="GET"))

        class WellKnown(everything.WellKnownBase):
            async def Now(self, stream: Any) -> None:
                assert isinstance(await stream.recv_message(), Empty)
                await stream.send_message(Timestamp(seconds=1234, nanos=5))

            async def Pack(self, stream: Any) -> None:
                packed = AnyMessage()
                packed.Pack(await stream.recv_message())
                await stream.send_message(packed)

            async def Unpack(self, stream: Any) -> None:
                value = StringValue()
                assert (await stream.recv_message()).Unpack(value)
                await stream.send_message(Int64Value(value=len(value.value)))

            async def Nothing(self, stream: Any) -> None:
                await stream.recv_message()
                for _ in range(3):
                    await stream.send_message(Empty())

        return [Everything(), WellKnown()]


def packed(text: str) -> AnyMessage:
    message = AnyMessage()
    message.Pack(StringValue(value=text))
    return message


async def test_every_cardinality_nested_optional_and_well_known_types_over_a_socket(gen: pathlib.Path) -> None:
    everything, pb2 = load("s16review.v1.everything_grpc"), load("s16review.v1.everything_pb2")
    Outer, Inner = pb2.Outer, pb2.Outer.Inner
    async with running_server(EverythingService.make(everything, pb2)) as (_, target), Channel(target) as channel:
        stub, known = everything.EverythingStub(channel), everything.WellKnownStub(channel)
        reply = await stub.Unary(Inner(n=0, note="é"))
        assert isinstance(reply, Outer) and reply.inner.HasField("n") and reply.inner.n == 0
        assert not (await stub.Unary(Inner())).inner.HasField("n")  # proto3 optional: unset stays unset
        assert [(i.n, i.note) for i in await stub.ServerStream(Inner(n=3, note="s"))] == [(0, "s"), (1, "s"), (2, "s")]
        assert [i.note for i in await stub.ServerStream(Inner())] == ["no n"]
        summed = await stub.ClientStream([Inner(n=i) for i in range(4)])
        assert [i.n for i in summed.items] == [0, 1, 2, 3]
        echoed = await stub.Bidi(Outer(inner=Inner(n=i)) for i in range(3))
        assert [i.n for i in echoed] == [0, 1, 2]
        assert [(await m(Inner())).note for m in (stub.Get, stub.get, stub.GET)] == ["Get", "get", "GET"]
        assert await known.Now(Empty()) == Timestamp(seconds=1234, nanos=5)
        any_reply = await known.Pack(StringValue(value="wrapped"))
        assert any_reply.type_url == "type.googleapis.com/google.protobuf.StringValue"
        assert await known.Unpack(packed("four")) == Int64Value(value=4)
        assert await known.Nothing(Empty()) == [Empty()] * 3


async def test_grpcio_generated_stubs_call_our_server(gen: pathlib.Path) -> None:
    """grpcio's own generated stubs (grpc.aio) against app_kit's server: the same wire names."""
    everything, pb2 = load("s16review.v1.everything_grpc"), load("s16review.v1.everything_pb2")
    theirs = load("s16review.v1.everything_pb2_grpc")
    one: Any = load("s16review.same.one_grpc")
    two: Any = load("s16review.same.two_grpc")
    one_pb2, two_pb2 = load("s16review.same.one_pb2"), load("s16review.same.two_pb2")

    class GreeterOne(one.GreeterBase):
        async def Hello(self, stream: Any) -> None:
            await stream.send_message(one_pb2.M(a=(await stream.recv_message()).a + 1))

    class GreeterTwo(two.GreeterBase):
        async def Hello(self, stream: Any) -> None:
            await stream.send_message(two_pb2.M(a=(await stream.recv_message()).a + 2))

    Inner = pb2.Outer.Inner
    services = [*EverythingService.make(everything, pb2), GreeterOne(), GreeterTwo()]
    async with running_server(services) as (_, target), grpc.aio.insecure_channel(target) as channel:
        stub, known = theirs.EverythingStub(channel), theirs.WellKnownStub(channel)
        assert (await stub.Unary(Inner(n=5))).inner.n == 5
        assert [i.n async for i in stub.ServerStream(Inner(n=2))] == [0, 1]
        assert len((await stub.ClientStream(iter([Inner(), Inner()]))).items) == 2
        assert [i.n async for i in stub.Bidi(iter([pb2.Outer(inner=Inner(n=9))]))] == [9]
        assert (await stub.get(Inner())).note == "get"
        assert (await known.Now(Empty())).seconds == 1234
        assert [m async for m in known.Nothing(Empty())] == [Empty()] * 3
        # One service name in two packages, served side by side.
        assert (await load("s16review.same.one_pb2_grpc").GreeterStub(channel).Hello(one_pb2.M(a=1))).a == 2
        assert (await load("s16review.same.two_pb2_grpc").GreeterStub(channel).Hello(two_pb2.M(a=1))).a == 3


async def test_every_other_service_round_trips_with_our_client_and_server(gen: pathlib.Path) -> None:
    """Each service of the other clean modules, implemented on its generated base (methods named
    print, open, type, channel, self, stream, method_for, typing; services named class and None;
    import public; hyphens; very long names; deprecated; no package), called through its stub."""
    legacy: Any = load("s16review.legacy_grpc")
    legacy_pb2 = load("s16review.legacy_pb2")

    class Legacy(legacy.LegacyBase):
        async def Hello(self, stream: Any) -> None:
            request = await stream.recv_message()
            await stream.send_message(legacy_pb2.Req(name=request.name.upper(), n=request.n + 1))

    services: list[Any] = []
    calls: list[tuple[Any, str, Any, Any]] = []  # (method of a stub, path, request type, reply type)
    for module in CLEAN:
        if module in ("s16review.v1.everything", "s16review.legacy", "s16review.empty_service"):
            continue
        generated = load(f"{module}_grpc")
        for name in service_names(module):
            service = implement(getattr(generated, f"{name}Base"))
            services.append(service)
            for path, handler in service.__mapping__().items():
                calls.append((service, path, handler.request_type, handler.reply_type))
    async with running_server([*services, Legacy()]) as (_, target), Channel(target) as channel:
        stubs: dict[tuple[str, str], Any] = {}
        for service, path, request_type, reply_type in calls:
            service_name, method = path[1:].rsplit("/", 1)
            module = type(service).__mro__[1].__module__
            short = service_name.rsplit(".", 1)[-1]
            stub = stubs.setdefault((module, short), getattr(sys.modules[module], f"{short}Stub")(channel))
            call = getattr(stub, method)
            cardinality = call.cardinality
            request = request_type()
            if cardinality.client_streaming:
                reply = await call([request, request, request])
            else:
                reply = await call(request)
            if cardinality.server_streaming:
                assert [type(r) for r in reply] == [reply_type, reply_type], path
            else:
                assert type(reply) is reply_type, path
            assert service.seen[path] == (3 if cardinality.client_streaming else 1), path
        assert len(calls) == 1 + 2 + 1 + 8 + 1 + 1 + 1 + 5 + 2 + 1
        hello = await legacy.LegacyStub(channel).Hello(legacy_pb2.Req(name="proto2"))
        assert (hello.name, hello.n, hello.HasField("n")) == ("PROTO2", 8, True)  # default 7 read, 8 sent


@pytest.fixture(scope="module")
def mypy_output(gen: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """mypy --strict over the generated modules and a user's module, as a user's project runs it:
    app_kit installed (a virtual environment pointing at this checkout). protobuf's own stubs are
    not ours to judge: the _pb2 modules' errors are ignored, as is google.protobuf's lack of stubs
    (types-protobuf is not installed here)."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, system_site_packages=True, with_pip=False, symlinks=True)
    [site_packages] = env.glob("lib/python3*/site-packages")
    (site_packages / "app_kit_checkout.pth").write_text(f"{ROOT}\n")
    pb2 = sorted(".".join(p.relative_to(gen).with_suffix("").parts) for p in gen.rglob("*_pb2.pyi"))
    (gen / "mypy.ini").write_text(
        f"[mypy]\n\n[mypy-google.*]\nignore_missing_imports = True\n\n[mypy-{','.join(pb2)}]\nignore_errors = True\n"
    )
    (gen / "s16_user_app.py").write_text(textwrap.dedent(USER_APP).lstrip())
    modules = [*(f"{m}_grpc" for m in CLEAN), "s16review.shadow_grpc", "s16_user_app"]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini", "--python-executable"]
        + [str(env / "bin" / "python"), "--cache-dir", str(env / "mypy_cache")]
        + [arg for m in modules for arg in ("-m", m)],
        cwd=gen,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout + result.stderr


USER_APP = """
from __future__ import annotations

from app_kit import Stream
from app_kit.client import Channel
from s16review.v1 import everything_grpc
from s16review.v1.everything_pb2 import Outer


class Impl(everything_grpc.EverythingBase):
    async def Unary(self, stream: Stream[Outer.Inner, Outer]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(Outer(inner=request))

    def Get(self, stream: Stream[Outer.Inner, Outer.Inner]) -> None:  # expect override: not async
        pass


async def use(channel: Channel) -> None:
    stub = everything_grpc.EverythingStub(channel)
    reply: Outer = await stub.Unary(Outer.Inner(n=1), timeout=1.5)
    parts: list[Outer.Inner] = await stub.ServerStream(Outer.Inner())
    summary: Outer = await stub.ClientStream([Outer.Inner()])
    echoed: list[Outer.Inner] = await stub.Bidi([Outer()])
    print(reply, parts, summary, echoed)
    await stub.Unary([Outer.Inner()])  # expect arg-type: a unary method takes one message
    await stub.Unary(Outer.Inner(), timeout="soon")  # expect arg-type: the call options are typed
    one: Outer = await stub.ServerStream(Outer.Inner())  # expect assignment: server streaming gives a list
    await stub.Unknown(Outer.Inner())  # expect attr-defined: the stub has only its methods
    print(one)
"""


def mypy_errors(output: str, path: str) -> set[tuple[int, str]]:
    pattern = rf"^{re.escape(path)}:(\d+): error: .*\[([\w-]+)\]$"
    return {(int(m[1]), m[2]) for m in re.finditer(pattern, output, re.M)}


def test_generated_modules_are_mypy_strict_clean_and_carry_the_types(mypy_output: str) -> None:
    for module in CLEAN:
        path = module.replace(".", "/") + "_grpc.py"
        assert f"{path}:" not in mypy_output, mypy_output
    expected = {
        (number, match[1])
        for number, line in enumerate(textwrap.dedent(USER_APP).lstrip().splitlines(), start=1)
        if (match := re.search(r"# expect ([\w-]+):", line))
    }
    assert len(expected) == 5
    assert mypy_errors(mypy_output, "s16_user_app.py") == expected, mypy_output


# -- defects --------------------------------------------------------------------------------


def test_comment_ending_in_a_quote(gen: pathlib.Path) -> None:
    # `// Says "hi"` becomes `"""Says "hi""""`; grpcio's plugin puts the closing quotes on a line of their own.
    assert inspect.getdoc(load("s16review.quote_end_grpc").QuotedBase) == 'Says "hi"'


def test_trailing_comment_is_a_docstring(gen: pathlib.Path) -> None:
    # grpcio's plugin makes `rpc Trailing(M) returns (M);  // Trailing words.` its docstring.
    assert '"""Trailing words.' in (gen / "s16review/comments_pb2_grpc.py").read_text()
    assert inspect.getdoc(load("s16review.comments_grpc").DocumentedBase.Trailing) == "Trailing words."


def test_method_named_abc(gen: pathlib.Path) -> None:
    # grpcio's code imports; ours evaluates `@abc.abstractmethod` after `async def abc` rebound the name.
    assert load("s16review.abc_method_pb2_grpc").LettersStub is not None
    letters = load("s16review.abc_method_grpc")
    assert set(implement(letters.LettersBase).__mapping__()) == {"/s16.letters.Letters/abc", "/s16.letters.Letters/xyz"}


def test_methods_named_like_builtins_the_annotations_use(gen: pathlib.Path, mypy_output: str) -> None:
    # At run time it works (the annotations are strings) ...
    shadow = implement(load("s16review.shadow_grpc").ShadowBase)
    assert set(shadow.__mapping__()) == {"/s16.shadow.Shadow/str", "/s16.shadow.Shadow/dict"}
    # ... but mypy reads `dict[str, app_kit.Handler]` in the class's scope: 'Function "dict" is not valid as a type'.
    assert mypy_errors(mypy_output, "s16review/shadow_grpc.py") == set(), mypy_output


async def test_proto_under_a_directory_named_channel(gen: pathlib.Path) -> None:
    chat: Any = load("channel.v1.s16chat_grpc")
    pb2 = load("channel.v1.s16chat_pb2")

    class Chat(chat.ChatBase):
        async def Say(self, stream: Any) -> None:
            await stream.send_message(pb2.Line(text=(await stream.recv_message()).text * 2))

    async with running_server([Chat()]) as (_, target), Channel(target) as channel:
        # `channel.v1.s16chat_pb2.Line` in the stub's __init__ reads its parameter `channel`.
        assert (await chat.ChatStub(channel).Say(pb2.Line(text="ab"))).text == "abab"


def test_file_name_with_a_dot(gen: pathlib.Path) -> None:
    # protobuf writes s16review/dotted/name_pb2.py, grpcio s16review/dotted/name_pb2_grpc.py;
    # ours goes to s16review/dotted.name_grpc.py, which no import statement reaches.
    assert (gen / "s16review/dotted/name_pb2.py").exists() and (gen / "s16review/dotted/name_pb2_grpc.py").exists()
    dotted = load("s16review.dotted.name_grpc")
    assert list(implement(dotted.DottedBase).__mapping__()) == ["/s16.dotted.Dotted/Go"]


def test_methods_named_like_keywords(tmp_path: pathlib.Path) -> None:
    """protoc accepts them and protobuf's generator copes; grpcio's plugin fails the same way.
    Either the plugin names them so that Python accepts them (the path kept), or protoc stops
    saying which name is the trouble: not a module that cannot be imported."""
    write_protos(
        tmp_path / "src",
        {
            "s16kw/keywords.proto": f"""
                syntax = "proto3";
                package s16.kw;
                {MESSAGE_M}
                service Keywords {{ rpc class(M) returns (M); rpc import(M) returns (M); rpc None(M) returns (M); }}
            """
        },
    )
    result = protoc(tmp_path / "src", tmp_path / "gen", ["s16kw/keywords.proto"])
    if result.returncode != 0:
        assert "class" in result.stderr, result.stderr
        return
    generated = tmp_path / "gen/s16kw/keywords_grpc.py"
    compile(generated.read_text(), str(generated), "exec")
    sys.path.insert(0, str(tmp_path / "gen"))
    try:
        keywords = load("s16kw.keywords_grpc")
    finally:
        sys.path.remove(str(tmp_path / "gen"))
    assert set(implement(keywords.KeywordsBase).__mapping__()) == {
        "/s16.kw.Keywords/class",
        "/s16.kw.Keywords/import",
        "/s16.kw.Keywords/None",
    }


def test_editions_file(tmp_path: pathlib.Path) -> None:
    edition = {
        "s16ed/ed.proto": f"""
            edition = "2023";
            package s16.editions;
            {MESSAGE_M}
            service Ed {{ rpc Go(M) returns (M); }}
        """
    }
    write_protos(tmp_path / "src", edition)
    grpcio_only = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path / 'src'}",
            f"--grpc_python_out={tmp_path}",
            "s16ed/ed.proto",
        ],
        cwd=tmp_path / "src",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert grpcio_only.returncode == 0, grpcio_only.stderr
    result = protoc(tmp_path / "src", tmp_path / "gen", ["s16ed/ed.proto"])
    # Today: "is an editions file, but code generator protoc-gen-app_kit hasn't been updated to support editions yet".
    assert result.returncode == 0, result.stderr
    assert '"/s16.editions.Ed/Go"' in (tmp_path / "gen/s16ed/ed_grpc.py").read_text()


def test_import_prefix_with_well_known_types(tmp_path: pathlib.Path) -> None:
    prefixed = {
        "s16pfx/clock.proto": """
            syntax = "proto3";
            package s16.pfx;
            import "google/protobuf/empty.proto";
            import "google/protobuf/timestamp.proto";
            service PfxClock { rpc Now(google.protobuf.Empty) returns (google.protobuf.Timestamp); }
        """
    }
    write_protos(tmp_path / "src", prefixed)
    result = protoc(
        tmp_path / "src", tmp_path / "root/gen16pfx", ["s16pfx/clock.proto"], app_kit_opt="import_prefix=gen16pfx.:"
    )
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(tmp_path / "root"))
    try:
        # `import gen16pfx.google.protobuf.empty_pb2`: the well-known types are protobuf's modules.
        clock = load("gen16pfx.s16pfx.clock_grpc")
    finally:
        sys.path.remove(str(tmp_path / "root"))
    [handler] = implement(clock.PfxClockBase).__mapping__().values()
    assert (handler.request_type, handler.reply_type) == (Empty, Timestamp)
