"""gRPC server reflection (``grpc.reflection.v1`` and ``v1alpha``), for grpcurl and friends."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

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

__all__ = ["DescriptorIndex", "Reflection", "ReflectionV1", "ReflectionV1Alpha"]

_REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


class _NotFound(Exception):
    pass


class DescriptorIndex:
    """Answers reflection's questions from descriptor pools (protobuf's default and ours)."""

    def __init__(self, service_names: Iterable[str], pools: Sequence[descriptor_pool.DescriptorPool] = ()) -> None:
        self.service_names = sorted(set(service_names))
        self.pools = [*pools, descriptor_pool.Default(), protos.POOL]

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
                descriptor = self._first("FindServiceByName", service)
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

    @staticmethod
    def serialized_with_dependencies(file: FileDescriptor) -> list[bytes]:
        """``file`` and every file it depends on, transitively, each once (``file`` first)."""
        result, seen, pending = [], set(), [file]
        while pending:
            current = pending.pop(0)
            if current.name in seen:
                continue
            seen.add(current.name)
            proto = descriptor_pb2.FileDescriptorProto()
            current.CopyToProto(proto)
            result.append(proto.SerializeToString())
            pending.extend(current.dependencies)
        return result


class _ReflectionMixin:
    """The bidi ``ServerReflectionInfo`` over a :class:`DescriptorIndex`, for one proto version."""

    pb2: ModuleType

    def __init__(self, index: DescriptorIndex) -> None:
        self.index = index

    async def ServerReflectionInfo(self, stream: Stream[Any, Any]) -> None:
        """One response per request, in order, until the client ends the stream."""
        async for request in stream:
            await stream.send_message(self._answer(request))

    def _answer(self, request: Any) -> Any:
        pb2, index = self.pb2, self.index
        response = pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    pb2.ServiceResponse(name=name) for name in index.service_names
                )
            elif kind == "file_by_filename":
                file = index.file_by_name(request.file_by_filename)
                response.file_descriptor_response.file_descriptor_proto.extend(index.serialized_with_dependencies(file))
            elif kind == "file_containing_symbol":
                file = index.file_containing_symbol(request.file_containing_symbol)
                response.file_descriptor_response.file_descriptor_proto.extend(index.serialized_with_dependencies(file))
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                file = index.extension(wanted.containing_type, wanted.extension_number)
                response.file_descriptor_response.file_descriptor_proto.extend(index.serialized_with_dependencies(file))
            elif kind == "all_extension_numbers_of_type":
                name = request.all_extension_numbers_of_type
                response.all_extension_numbers_response.base_type_name = name
                response.all_extension_numbers_response.extension_number.extend(index.extension_numbers(name))
            else:
                response.error_response.error_code = Status.UNIMPLEMENTED.value
                response.error_response.error_message = f"unsupported request {kind or '(empty)'}"
        except _NotFound as missing:
            response.ClearField("message_response")
            response.error_response.error_code = Status.NOT_FOUND.value
            response.error_response.error_message = f"not found: {missing.args[0]}"
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
        services: Iterable[ServiceLike], pools: Sequence[descriptor_pool.DescriptorPool] = ()
    ) -> list[ServiceLike]:
        """Both reflection services, describing ``services`` and themselves.

        ``pools`` adds descriptor pools to search besides protobuf's default one (for codecs
        whose messages live elsewhere).
        """
        names = {path.split("/")[1] for service in services for path in service.__mapping__()}
        index = DescriptorIndex([*names, *_REFLECTION_SERVICES], pools)
        return [ReflectionV1(index), ReflectionV1Alpha(index)]
