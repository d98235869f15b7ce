"""Server reflection against grpcio-reflection's descriptor database (v1alpha) and a v1 client."""

from __future__ import annotations

import asyncio
import signal

import anyio
import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from app_kit import Health, Stream
from app_kit.protos.grpc.reflection.v1 import reflection_pb2 as v1
from app_kit.services.reflection import Reflection
from examples.cafe.service import CoffeeMachine

from .conftest import running_server
from .process import AppProcess
from .protogen import generate_into

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def billing(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with generate_into(tmp_path_factory.mktemp("reflect")) as modules:

        class Billing(modules["billing"].BillingBase):
            async def Charge(self, stream: Stream) -> None:  # type: ignore[type-arg]
                raise NotImplementedError

            Watch = Upload = History = Charge

        yield Billing()


def services_under_test(billing):  # type: ignore[no-untyped-def]
    services = [CoffeeMachine(), billing, Health()]
    return [*services, *Reflection.for_services(services)]


EXPECTED_SERVICES = [
    "acme.billing.Billing",
    "cafe.CoffeeMachine",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]


def resolve_everything(pool: descriptor_pool.DescriptorPool, names: list[str]) -> set[str]:
    """Every service, method and message type reachable from ``names``, resolved in ``pool``."""
    resolved = set()
    for name in names:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            resolved.add(method.full_name)
            for message in (method.input_type, method.output_type):
                resolved.add(pool.FindMessageTypeByName(message.full_name).full_name)
                for field in message.fields:
                    if field.message_type is not None:
                        resolved.add(field.message_type.full_name)
    return resolved


async def test_v1alpha_with_grpcio_reflection_database(billing) -> None:  # type: ignore[no-untyped-def]
    async with running_server(services_under_test(billing)) as (_, target):

        def reflect() -> tuple[list[str], set[str], list[int]]:
            with grpc.insecure_channel(target) as channel:
                database = ProtoReflectionDescriptorDatabase(channel)
                pool = descriptor_pool.DescriptorPool(database)
                names = list(database.get_services())
                resolved = resolve_everything(pool, names)
                options = pool.FindMessageTypeByName("google.protobuf.MessageOptions")
                numbers = [e.number for e in pool.FindAllExtensions(options)]
                return names, resolved, numbers

        names, resolved, numbers = await anyio.to_thread.run_sync(reflect)
    assert sorted(names) == EXPECTED_SERVICES
    assert {
        "acme.billing.Billing.Watch",
        "acme.common.Money.Detail",  # nested, from an imported file
        "acme.common.Money",
        "cafe.CoffeeMachine.MakeLatte",
        "cafe.LatteOrder",
        "grpc.health.v1.HealthCheckResponse",
        "grpc.reflection.v1alpha.ServerReflectionResponse",
    } <= resolved
    assert 50001 in numbers


async def _v1_exchange(target: str, requests: list[v1.ServerReflectionRequest]) -> list[v1.ServerReflectionResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            v1.ServerReflectionRequest.SerializeToString,
            v1.ServerReflectionResponse.FromString,
        )
        return [response async for response in info(iter(requests))]


def _pool_from(responses: list[v1.ServerReflectionResponse]) -> descriptor_pool.DescriptorPool:
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for response in responses:
        for blob in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
            files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:  # dependencies first
        if name in added:
            return
        for dependency in files[name].dependency:
            add(dependency)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return pool


async def test_v1_many_requests_on_one_stream(billing) -> None:  # type: ignore[no-untyped-def]
    async with running_server(services_under_test(billing)) as (_, target):
        requests = [
            v1.ServerReflectionRequest(list_services=""),
            *(v1.ServerReflectionRequest(file_containing_symbol=name) for name in EXPECTED_SERVICES),
            v1.ServerReflectionRequest(file_containing_symbol="cafe.BrewStatus.Stage"),
            v1.ServerReflectionRequest(file_containing_symbol="acme.billing.Billing.Charge"),
            v1.ServerReflectionRequest(file_by_filename="acme/billing/billing-api.proto"),
            v1.ServerReflectionRequest(
                file_containing_extension=v1.ExtensionRequest(
                    containing_type="google.protobuf.MessageOptions", extension_number=50001
                )
            ),
            v1.ServerReflectionRequest(all_extension_numbers_of_type="google.protobuf.MessageOptions"),
            v1.ServerReflectionRequest(file_containing_symbol="no.such.Thing"),
            v1.ServerReflectionRequest(file_by_filename="no/such.proto"),
            v1.ServerReflectionRequest(all_extension_numbers_of_type="no.Such"),
        ]
        responses = await _v1_exchange(target, requests)
    assert len(responses) == len(requests)
    assert [r.original_request for r in responses] == requests  # one answer per request, in order
    assert sorted(s.name for s in responses[0].list_services_response.service) == EXPECTED_SERVICES
    pool = _pool_from(responses[1:10])
    assert "acme.billing.Billing.Watch" in resolve_everything(pool, EXPECTED_SERVICES)
    assert pool.FindEnumTypeByName("cafe.BrewStatus.Stage").values_by_name["DONE"].number == 5
    assert 50001 in responses[10].all_extension_numbers_response.extension_number
    assert responses[10].all_extension_numbers_response.base_type_name == "google.protobuf.MessageOptions"
    for response in responses[11:]:
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "not found" in response.error_response.error_message


async def test_cafe_process_called_with_reflected_descriptors_only() -> None:
    async with AppProcess("examples.cafe.app:app", "--port", "0", env={"CAFE_BREW_STEP": "0"}) as app:
        port = await app.ready()
        target = f"127.0.0.1:{port}"

        def reflect_and_call() -> tuple[list[str], str, int]:
            with grpc.insecure_channel(target) as channel:
                database = ProtoReflectionDescriptorDatabase(channel)
                pool = descriptor_pool.DescriptorPool(database)  # a fresh pool: nothing imported
                services = list(database.get_services())
                method = pool.FindMethodByName("cafe.CoffeeMachine.MakeLatte")
                order_class = message_factory.GetMessageClass(method.input_type)
                latte_class = message_factory.GetMessageClass(method.output_type)
                make_latte = channel.unary_unary(
                    "/cafe.CoffeeMachine/MakeLatte", order_class.SerializeToString, latte_class.FromString
                )
                latte = make_latte(order_class(milk_ml=250, shots=3, name="Reflected"), timeout=5)
                return services, latte.description, latte.order_id

        services, description, order_id = await anyio.to_thread.run_sync(reflect_and_call)
        assert "cafe.CoffeeMachine" in services and "grpc.health.v1.Health" in services
        assert description == "3-shot latte, 250 ml milk for Reflected"
        assert order_id == 1
        app.signal(signal.SIGTERM)
        assert await asyncio.wait_for(app.wait(), 10) == 0
