"""``protoc-gen-app_kit``: generates ``<name>_grpc.py`` with service bases and client stubs.

Use it as ``python -m grpc_tools.protoc -I. --python_out=. --app_kit_out=. cafe.proto``
(the console script must be on ``PATH``; or pass ``--plugin=protoc-gen-app_kit=...``).

Option ``import_prefix=pkg.`` (``--app_kit_opt=import_prefix=pkg.``) prefixes the modules
of the ``_pb2`` imports, for generated code that lives inside another package.
"""

from __future__ import annotations

import keyword
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf import descriptor_pb2
from google.protobuf.compiler.plugin_pb2 import CodeGeneratorRequest, CodeGeneratorResponse
from google.protobuf.descriptor_pb2 import DescriptorProto, FileDescriptorProto, ServiceDescriptorProto

__all__ = ["generate", "main"]

_SUFFIX = "_grpc.py"
_CARDINALITIES = {
    (False, False): "UNARY_UNARY",
    (False, True): "UNARY_STREAM",
    (True, False): "STREAM_UNARY",
    (True, True): "STREAM_STREAM",
}


def proto_module(proto_path: str) -> str:
    """The Python module protobuf's own generator makes of a ``.proto`` file."""
    base = proto_path[: -len(".proto")] if proto_path.endswith(".proto") else proto_path
    return base.replace("-", "_").replace("/", ".") + "_pb2"


def _alias(module: str) -> str:
    """The name a ``_pb2`` module is imported as (grpcio's spelling): never the first part of
    its dotted path, which a parameter or a method of the same name would hide
    (``channel/v1/chat.proto``)."""
    return module.replace("_", "__").replace(".", "_dot_")


def _python_name(name: str, taken: set[str]) -> str:
    """A method's Python name: its proto name, with ``_`` after a keyword (``class_``: PEP 8's
    way; more if another method of the service is named so); its path keeps the proto name."""
    if not keyword.iskeyword(name):
        return name
    python_name = f"{name}_"
    while python_name in taken:
        python_name += "_"
    taken.add(python_name)
    return python_name


@dataclass(frozen=True)
class _Method:
    name: str
    path: str
    cardinality: str
    request: str
    reply: str
    comment: str


def _message_types(proto: FileDescriptorProto) -> Iterator[tuple[str, str]]:
    """Yield ``(fully qualified proto name, Python attribute path)`` of every message."""
    prefix = f".{proto.package}" if proto.package else ""

    def walk(messages: list[DescriptorProto], scope: str, python_scope: str) -> Iterator[tuple[str, str]]:
        for message in messages:
            name = f"{scope}.{message.name}"
            python_name = f"{python_scope}.{message.name}" if python_scope else message.name
            yield name, python_name
            yield from walk(list(message.nested_type), name, python_name)

    yield from walk(list(proto.message_type), prefix, "")


def _comments(proto: FileDescriptorProto) -> dict[tuple[int, ...], str]:
    # The comment before a declaration, else the one after it on its line (as grpcio's).
    return {
        tuple(location.path): (location.leading_comments or location.trailing_comments).strip()
        for location in proto.source_code_info.location
        if location.leading_comments or location.trailing_comments
    }


def _docstring(text: str, indent: str) -> list[str]:
    if not text:
        return []
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    lines = text.splitlines()
    if len(lines) == 1:
        line = lines[0][:-1] + '\\"' if lines[0].endswith('"') else lines[0]  # (not run into the quotes)
        return [f'{indent}"""{line}"""']
    return [f'{indent}"""{lines[0]}', *(f"{indent}{line}".rstrip() for line in lines[1:]), f'{indent}"""']


def _render(proto: FileDescriptorProto, types: dict[str, tuple[str, str]], own_module: str) -> str:
    comments = _comments(proto)
    # The file's own _pb2 always: importing it is what puts the file (its services too) in
    # protobuf's descriptor pool, where reflection finds them, even when the file defines no
    # messages of its own (methods of google.protobuf.Empty, or of another file's messages).
    modules: set[str] = {own_module}
    services: list[tuple[ServiceDescriptorProto, str, list[_Method]]] = []
    for service_index, service in enumerate(proto.service):
        full_name = f"{proto.package}.{service.name}" if proto.package else service.name
        methods = []
        taken = {method.name for method in service.method}
        for method_index, method in enumerate(service.method):
            request_module, request_name = types[method.input_type]
            reply_module, reply_name = types[method.output_type]
            modules.update((request_module, reply_module))
            methods.append(
                _Method(
                    name=_python_name(method.name, taken),
                    path=f"/{full_name}/{method.name}",
                    cardinality=_CARDINALITIES[(method.client_streaming, method.server_streaming)],
                    request=f"{_alias(request_module)}.{request_name}",
                    reply=f"{_alias(reply_module)}.{reply_name}",
                    comment=comments.get((6, service_index, 2, method_index), ""),
                )
            )
        services.append((service, comments.get((6, service_index), ""), methods))

    out = [
        "# Generated by protoc-gen-app_kit. DO NOT EDIT!",
        f"# source: {proto.name}",
        '"""gRPC service bases and client stubs for ' + proto.name + '."""',
        "",
        "from __future__ import annotations",
        "",
        # Names the class bodies use, imported under names no proto method can have (they
        # begin with a letter): a method named abc, dict or str would hide the usual ones.
        "import abc as _abc",
        "import builtins as _builtins",
        "import typing",
        "",
        "import app_kit",
        "",
        *(f"import {module} as {_alias(module)}" for module in sorted(modules)),
        "",
        "if typing.TYPE_CHECKING:",
        "    import app_kit.client",
    ]
    for service, comment, methods in services:
        out += ["", "", f"class {service.name}Base(_abc.ABC):"]
        out += _docstring(comment, "    ") or [f'    """Implement the methods of {service.name} and serve it."""']
        for method in methods:
            stream_type = f"app_kit.Stream[{method.request}, {method.reply}]"
            out += [
                "",
                "    @_abc.abstractmethod",
                f"    async def {method.name}(self, stream: {stream_type}) -> None:",
                *(_docstring(method.comment, "        ") or [f'        """{method.path}"""']),
            ]
        out += [
            "",
            "    def __mapping__(self) -> _builtins.dict[_builtins.str, app_kit.Handler]:",
            '        """Map the paths of this service to its handlers."""',
            "        return {",
        ]
        for method in methods:
            out += [
                f'            "{method.path}": app_kit.Handler(',
                f"                self.{method.name},",
                f"                app_kit.Cardinality.{method.cardinality},",
                f"                {method.request},",
                f"                {method.reply},",
                "            ),",
            ]
        out += ["        }"]

        out += ["", "", f"class {service.name}Stub:"]
        out += [f'    """Client of {service.name}: one callable per method."""', ""]
        out += ["    def __init__(self, channel: app_kit.client.Channel) -> None:"]
        out += ["        from app_kit.client import method_for", ""]
        for method in methods:
            cls = "".join(part.title() for part in method.cardinality.lower().split("_")) + "Method"
            out += [
                f"        self.{method.name}: app_kit.client.{cls}[{method.request}, {method.reply}] = method_for(",
                f'            channel, "{method.path}", app_kit.Cardinality.{method.cardinality},',
                f"            {method.request}, {method.reply},",
                "        )",
            ]
        if not methods:
            out += ["        del channel, method_for"]
    return "\n".join(out) + "\n"


def generate(request: CodeGeneratorRequest) -> CodeGeneratorResponse:
    """Build the plugin's response: one ``_grpc.py`` per requested file that has services."""
    options = dict(item.partition("=")[::2] for item in request.parameter.split(",") if item)
    unknown = set(options) - {"import_prefix"}
    response = CodeGeneratorResponse()
    if unknown:
        response.error = f"unknown option(s): {', '.join(sorted(unknown))}"
        return response
    prefix = options.get("import_prefix", "")
    types: dict[str, tuple[str, str]] = {}
    for proto in request.proto_file:
        # protobuf's own types stay where protobuf put them, whatever the prefix.
        own = "" if proto.name.startswith("google/protobuf/") else prefix
        module = own + proto_module(proto.name)
        for full_name, python_name in _message_types(proto):
            types[full_name] = (module, python_name)
    # Editions change nothing this reads (services, methods, message names): taken as far as
    # grpcio's plugin takes them, where this protobuf knows of them.
    response.supported_features = CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    if hasattr(CodeGeneratorResponse, "FEATURE_SUPPORTS_EDITIONS") and hasattr(descriptor_pb2, "EDITION_2024"):
        response.supported_features |= CodeGeneratorResponse.FEATURE_SUPPORTS_EDITIONS
        response.minimum_edition = descriptor_pb2.EDITION_PROTO2
        response.maximum_edition = descriptor_pb2.EDITION_2024
    by_name = {proto.name: proto for proto in request.proto_file}
    for name in request.file_to_generate:
        proto = by_name[name]
        if not proto.service:
            continue
        output = response.file.add()
        # Beside protobuf's _pb2 module (a dot in the file's name is a directory to it too).
        output.name = proto_module(name)[: -len("_pb2")].replace(".", "/") + _SUFFIX
        output.content = _render(proto, types, prefix + proto_module(proto.name))
    return response


def main() -> None:
    """Run as a protoc plugin: a request on stdin, a response on stdout."""
    request = CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
