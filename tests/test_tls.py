"""TLS on the client: mutual TLS with client_tls(), a server-name override, and a caller's
context used as given (never changed)."""

from __future__ import annotations

import pathlib
import ssl

import pytest
import trustme
from google.protobuf.wrappers_pb2 import StringValue

from app_kit import Cardinality, Channel, GRPCError, Handler, Status, Stream, client_tls
from app_kit.aio.client import method_for

from .conftest import running_server

pytestmark = pytest.mark.anyio


class WhoAmI:
    """Answers with the common name of the client's certificate (or 'anonymous')."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.W/Who": Handler(self.who, Cardinality.UNARY_UNARY, StringValue, StringValue)}

    async def who(self, stream: Stream[StringValue, StringValue]) -> None:
        await stream.recv_message()
        cert = stream.peer.cert() or {}
        names = [value for field in cert.get("subject", ()) for key, value in field if key == "commonName"]
        await stream.send_message(StringValue(value=names[0] if names else "anonymous"))


async def who(channel: Channel) -> str:
    reply = await method_for(channel, "/t.W/Who", Cardinality.UNARY_UNARY, StringValue, StringValue)(
        StringValue(), timeout=5
    )
    return reply.value


async def test_mutual_tls_with_a_server_name_override(tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.internal").configure_cert(server_context)  # not the address we dial
    server_context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a client certificate is required
    ca.configure_trust(server_context)
    client_pem = tmp_path / "client.pem"
    ca.issue_cert("billing-worker", common_name="billing-worker").private_key_and_cert_chain_pem.write_to_path(
        str(client_pem)
    )
    roots = ca.cert_pem.bytes()
    async with running_server([WhoAmI()], ssl=server_context) as (_, target):
        host, port = target.rsplit(":", 1)
        context = client_tls(root_certificates=roots, certificate_chain=client_pem)
        async with Channel(host, int(port), ssl=context, server_hostname="api.internal") as channel:
            assert await who(channel) == "billing-worker"
        # Without the override the certificate (for api.internal) does not match 127.0.0.1.
        async with Channel(
            host, int(port), ssl=client_tls(root_certificates=roots, certificate_chain=client_pem)
        ) as channel:
            with pytest.raises(GRPCError) as info:
                await who(channel)
            assert info.value.status is Status.UNAVAILABLE and "certificate" in (info.value.message or "").lower()
        # Without a client certificate the server refuses the handshake.
        async with Channel(
            host, int(port), ssl=client_tls(root_certificates=roots), server_hostname="api.internal"
        ) as channel:
            with pytest.raises(GRPCError) as info:
                await who(channel)
            assert info.value.status is Status.UNAVAILABLE


async def test_a_callers_context_is_used_as_given() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    mine = ssl.create_default_context()
    ca.configure_trust(mine)  # no ALPN: Channel must not add it to a context it does not own
    async with running_server([WhoAmI()], ssl=server_context) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with Channel("localhost", port, ssl=mine) as channel:
            with pytest.raises(GRPCError) as info:
                await who(channel)
        assert info.value.status is Status.UNAVAILABLE
        assert "did not negotiate HTTP/2 (ALPN h2)" in (info.value.message or "")
        mine.set_alpn_protocols(["h2"])
        async with Channel("localhost", port, ssl=mine) as channel:
            assert await who(channel) == "anonymous"
    with pytest.raises(ValueError, match="server_hostname is for TLS"):
        Channel("localhost", 1, server_hostname="x")
    with pytest.raises(ValueError, match="private_key goes with certificate_chain"):
        client_tls(private_key="key.pem")
