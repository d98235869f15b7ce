"""gRPC server reflection (``grpc.reflection.v1`` and ``v1alpha``), for grpcurl and friends."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import anyio
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor

from .. import protos
from ..aio.stream import Stream
from ..protos.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from ..protos.grpc.reflection.v1.reflection_grpc import ServerReflectionBase as V1Base
from ..protos.grpc.reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from ..protos.grpc.reflection.v1alpha.reflection_grpc import ServerReflectionBase as V1AlphaBase
from ..rpc.handlers import ServiceLike
from ..rpc.status import Status

__all__ = [
    "DEFAULT_MAX_ECHO_LENGTH",
    "DEFAULT_MAX_REQUESTS_PER_SECOND",
    "DEFAULT_MAX_RESPONSE_BYTES_PER_SECOND",
    "DescriptorIndex",
    "Reflection",
    "ReflectionV1",
    "ReflectionV1Alpha",
]

_REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")

#: Largest request (serialized bytes) echoed back in ``original_request`` and ``valid_host``.
DEFAULT_MAX_ECHO_LENGTH = 512
#: Requests one ``ServerReflectionInfo`` stream may have answered per second (a burst of one second's worth).
DEFAULT_MAX_REQUESTS_PER_SECOND = 100.0
#: Response bytes one ``ServerReflectionInfo`` stream may be sent per second (a burst of one second's worth).
DEFAULT_MAX_RESPONSE_BYTES_PER_SECOND = 1024 * 1024
#: Characters of a name quoted in an error message.
_MAX_NAME_IN_MESSAGE = 100


class _NotFound(Exception):
    pass


class DescriptorIndex:
    """Answers reflection's questions from descriptor pools (protobuf's default and ours)."""

    def __init__(self, service_names: Iterable[str], pools: Sequence[descriptor_pool.DescriptorPool] = ()) -> None:
        self.service_names = sorted(set(service_names))
        self.pools = [*pools, descriptor_pool.Default(), protos.POOL]
        self._serialized: dict[FileDescriptor, bytes] = {}

    def _first(self, lookup: str, name: Any) -> Any:
        for pool in self.pools:
            try:
                return getattr(pool, lookup)(name)
            except KeyError:
                continue
        raise _NotFound(name)

    def file_by_name(self, name: str) -> FileDescriptor:
        """The file called ``name``."""
        return self._first("FindFileByName", name)

    def file_containing_symbol(self, symbol: str) -> FileDescriptor:
        """The file defining a service, method, message, field, enum or extension."""
        try:
            return self._first("FindFileContainingSymbol", symbol)
        except _NotFound:
            # A method: look up its service.
            service, _, method = symbol.rpartition(".")
            if service:
                try:
                    descriptor = self._first("FindServiceByName", service)
                except _NotFound:
                    raise _NotFound(symbol) from None  # the error names what was asked for
                if method in descriptor.methods_by_name:
                    return descriptor.file
            raise

    def message(self, name: str) -> Descriptor:
        """The message type called ``name``."""
        return self._first("FindMessageTypeByName", name)

    def extension(self, containing_type: str, number: int) -> FileDescriptor:
        """The file defining extension ``number`` of ``containing_type``."""
        message = self.message(containing_type)
        for pool in self.pools:
            try:
                return pool.FindExtensionByNumber(message, number).file
            except KeyError:
                continue
        raise _NotFound(f"{containing_type}({number})")

    def extension_numbers(self, containing_type: str) -> list[int]:
        """Every known extension number of ``containing_type``."""
        message = self.message(containing_type)
        numbers: set[int] = set()
        for pool in self.pools:
            try:
                numbers.update(extension.number for extension in pool.FindAllExtensions(message))
            except KeyError:
                continue
        return sorted(numbers)

    def serialized(self, file: FileDescriptor) -> bytes:
        """``file`` as a serialized ``FileDescriptorProto`` (computed once per file)."""
        data = self._serialized.get(file)
        if data is None:
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            data = self._serialized[file] = proto.SerializeToString()
        return data

    def serialized_with_dependencies(self, file: FileDescriptor, sent: set[str] | None = None) -> list[bytes]:
        """``file`` and every file it depends on, transitively, each once (``file`` first).

        Files named in ``sent`` are left out, except ``file`` itself; the names of the files
        returned are added to it (so one stream is sent each dependency once, as grpc-go does).
        """
        sent = set() if sent is None else sent
        result, seen, pending = [], set(), [file]
        while pending:
            current = pending.pop(0)
            if current.name in seen:
                continue
            seen.add(current.name)
            if current is file or current.name not in sent:
                result.append(self.serialized(current))
                sent.add(current.name)
            pending.extend(current.dependencies)
        return result


class _Budget:
    """A token bucket: ``rate`` per second, holding at most one second's worth; in debt, wait it off."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.tokens = rate or 0.0
        self.updated = anyio.current_time()

    async def spend(self, amount: float) -> None:
        if not self.rate:
            return
        now = anyio.current_time()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate) - amount
        self.updated = now
        if self.tokens < 0:
            await anyio.sleep(-self.tokens / self.rate)


def _shown(name: str) -> str:
    """``name`` quoted and escaped, cut short: safe and small in an error message."""
    if len(name) <= _MAX_NAME_IN_MESSAGE:
        return ascii(name)
    return f"{name[:_MAX_NAME_IN_MESSAGE]!a}... ({len(name)} characters)"


class _ReflectionMixin:
    """The bidi ``ServerReflectionInfo`` over a :class:`DescriptorIndex`, for one proto version.

    Limits:

    - ``max_echo_length``: a request of up to this many bytes is echoed in ``original_request``
      (and its ``host`` in ``valid_host``); a larger one is not echoed at all, and names in
      error messages are escaped and cut to 100 characters, so a reply never repeats a large input;
    - ``max_requests_per_second``, ``max_response_bytes_per_second`` (``None``: no limit): past a
      burst of one second's worth, each ``ServerReflectionInfo`` stream is answered no faster than
      this (the next request is read only when the budget allows; nothing is refused, so normal
      clients just wait).
    """

    pb2: ModuleType

    def __init__(
        self,
        index: DescriptorIndex,
        *,
        max_echo_length: int = DEFAULT_MAX_ECHO_LENGTH,
        max_requests_per_second: float | None = DEFAULT_MAX_REQUESTS_PER_SECOND,
        max_response_bytes_per_second: float | None = DEFAULT_MAX_RESPONSE_BYTES_PER_SECOND,
    ) -> None:
        if max_echo_length < 0:
            raise ValueError("max_echo_length cannot be negative")
        for name, rate in (
            ("max_requests_per_second", max_requests_per_second),
            ("max_response_bytes_per_second", max_response_bytes_per_second),
        ):
            if rate is not None and rate <= 0:
                raise ValueError(f"{name} must be positive (None: no limit)")
        self.index = index
        self.max_echo_length = max_echo_length
        self.max_requests_per_second = max_requests_per_second
        self.max_response_bytes_per_second = max_response_bytes_per_second

    async def ServerReflectionInfo(self, stream: Stream[Any, Any]) -> None:
        """One response per request, in order, until the client ends the stream."""
        requests = _Budget(self.max_requests_per_second)
        response_bytes = _Budget(self.max_response_bytes_per_second)
        sent_files: set[str] = set()
        async for request in stream:
            await requests.spend(1)
            response = self._answer(request, sent_files)
            await response_bytes.spend(response.ByteSize())
            await stream.send_message(response)

    def _answer(self, request: Any, sent_files: set[str] | None = None) -> Any:
        pb2, index = self.pb2, self.index
        if request.ByteSize() <= self.max_echo_length:
            response = pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
        else:
            response = pb2.ServerReflectionResponse()
        sent = set() if sent_files is None else sent_files
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    pb2.ServiceResponse(name=name) for name in index.service_names
                )
            elif kind == "file_by_filename":
                file = index.file_by_name(request.file_by_filename)
                response.file_descriptor_response.file_descriptor_proto.extend(
                    index.serialized_with_dependencies(file, sent)
                )
            elif kind == "file_containing_symbol":
                file = index.file_containing_symbol(request.file_containing_symbol)
                response.file_descriptor_response.file_descriptor_proto.extend(
                    index.serialized_with_dependencies(file, sent)
                )
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                file = index.extension(wanted.containing_type, wanted.extension_number)
                response.file_descriptor_response.file_descriptor_proto.extend(
                    index.serialized_with_dependencies(file, sent)
                )
            elif kind == "all_extension_numbers_of_type":
                name = request.all_extension_numbers_of_type
                numbers = index.extension_numbers(name)
                response.all_extension_numbers_response.base_type_name = name
                response.all_extension_numbers_response.extension_number.extend(numbers)
            else:
                response.error_response.error_code = Status.UNIMPLEMENTED.value
                response.error_response.error_message = f"unsupported request {kind or '(empty)'}"
        except _NotFound as missing:
            response.ClearField("message_response")
            response.error_response.error_code = Status.NOT_FOUND.value
            response.error_response.error_message = f"not found: {_shown(str(missing.args[0]))}"
        return response


class ReflectionV1(_ReflectionMixin, V1Base):
    """``grpc.reflection.v1.ServerReflection``."""

    pb2 = v1_pb2


class ReflectionV1Alpha(_ReflectionMixin, V1AlphaBase):
    """``grpc.reflection.v1alpha.ServerReflection`` (what older grpcurl versions ask)."""

    pb2 = v1alpha_pb2


class Reflection:
    """Builds the reflection services for a server."""

    @staticmethod
    def for_services(
        services: Iterable[ServiceLike],
        pools: Sequence[descriptor_pool.DescriptorPool] = (),
        *,
        max_echo_length: int = DEFAULT_MAX_ECHO_LENGTH,
        max_requests_per_second: float | None = DEFAULT_MAX_REQUESTS_PER_SECOND,
        max_response_bytes_per_second: float | None = DEFAULT_MAX_RESPONSE_BYTES_PER_SECOND,
    ) -> list[ServiceLike]:
        """Both reflection services, describing ``services`` and themselves.

        ``pools`` adds descriptor pools to search besides protobuf's default one (for codecs
        whose messages live elsewhere). The limits are :class:`ReflectionV1`'s, per stream.
        """
        names = {path.split("/")[1] for service in services for path in service.__mapping__()}
        index = DescriptorIndex([*names, *_REFLECTION_SERVICES], pools)
        limits: dict[str, Any] = {
            "max_echo_length": max_echo_length,
            "max_requests_per_second": max_requests_per_second,
            "max_response_bytes_per_second": max_response_bytes_per_second,
        }
        return [ReflectionV1(index, **limits), ReflectionV1Alpha(index, **limits)]
