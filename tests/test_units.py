"""The pure building blocks: framing, grpc-timeout, metadata, grpc-message, compression, codecs."""

from __future__ import annotations

import gzip

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from google.rpc import error_details_pb2

from app_kit import AppSettings, GRPCError, ProtoCodec, ProtoStatusDetailsCodec, Status
from app_kit.app.settings import load_settings
from app_kit.rpc.compression import DecompressedTooLarge, DecompressionError, compress, decompress
from app_kit.rpc.deadline import Deadline, encode_grpc_timeout, parse_grpc_timeout
from app_kit.rpc.framing import FramingError, MessageDecoder, MessageTooLarge, frame_message
from app_kit.rpc.metadata import decode_grpc_message, decode_metadata, encode_grpc_message, encode_metadata


def test_decoder_handles_any_split_and_accounts_every_byte() -> None:
    wire = frame_message(b"first") + frame_message(b"", True) + frame_message(b"x" * 300)
    for cut in range(1, 40):
        decoder = MessageDecoder(1000)
        received, accounted = [], 0
        for start in range(0, len(wire), cut):
            chunk = wire[start : start + cut]
            messages, compressed, leftover = decoder.feed(chunk)
            accounted += leftover + sum(share for _, share in messages)
            received += [(index in compressed, payload) for index, (payload, _) in enumerate(messages)]
        assert received == [(False, b"first"), (True, b""), (False, b"x" * 300)]
        assert accounted == len(wire)  # every byte is acknowledged exactly once
        assert decoder.buffered == 0


def test_decoder_rejects_large_prefix_before_the_body_and_bad_flags() -> None:
    with pytest.raises(MessageTooLarge):
        MessageDecoder(10).feed(b"\x00\x00\x00\x00\x0b")
    with pytest.raises(FramingError):
        MessageDecoder(10).feed(b"\x02\x00\x00\x00\x00")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1H", 3600), (b"2M", 120), (b"3S", 3), (b"4m", 0.004), (b"5u", 5e-6), (b"6n", 6e-9), (b"99999999S", 99999999)],
)
def test_grpc_timeout_parsing(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"1", b"123456789S", b"1s", b"-1S", b"+1S", b"1.0S", b" 1S", b"1SS"])
def test_grpc_timeout_rejects_malformed(value: bytes) -> None:
    with pytest.raises(ValueError):
        parse_grpc_timeout(value)


@pytest.mark.parametrize("seconds", [1e-9, 0.5, 1.0, 59.9, 3600 * 24 * 365, 1e12])
def test_grpc_timeout_encoding_round_trips_never_shorter(seconds: float) -> None:
    encoded = encode_grpc_timeout(seconds).encode()
    assert len(encoded) <= 9
    assert parse_grpc_timeout(encoded) >= seconds * (1 - 1e-12) or seconds > 99999999 * 3600


def test_deadline() -> None:
    deadline = Deadline.from_timeout(10)
    assert 9 < deadline.time_remaining() <= 10
    assert not deadline.expired()
    assert Deadline.from_timeout(-1).time_remaining() == 0
    assert Deadline.from_timeout(1) < deadline


def test_metadata_round_trip_and_validation() -> None:
    fields = encode_metadata([("x-a", "1"), ("x-a", "2"), ("x-b-bin", b"\x00\xff")])
    assert fields == [(b"x-a", b"1"), (b"x-a", b"2"), (b"x-b-bin", b"AP8")]
    received = decode_metadata([(b":path", b"/a/b"), (b"te", b"trailers"), (b"grpc-timeout", b"1S"), *fields])
    assert received.getall("x-a") == ["1", "2"]
    assert received["x-b-bin"] == b"\x00\xff"
    assert set(received) == {"x-a", "x-b-bin"}
    assert decode_metadata([(b"x-pad-bin", b"AP8=")])["x-pad-bin"] == b"\x00\xff"  # padded accepted too
    for bad in ({"X-Upper": "v"}, {"grpc-status": "0"}, {"content-type": "x"}, {"x-ctl": "a\nb"}, {"x-u": "é"}):
        with pytest.raises(ValueError):
            encode_metadata(bad)
    with pytest.raises(TypeError):
        encode_metadata({"x-bin": "text"})
    with pytest.raises(TypeError):
        encode_metadata({"x-text": b"bytes"})
    with pytest.raises(ValueError):
        decode_metadata([(b"x-bad-bin", b"!!")])
    # RFC 9113 §8.2.1: no whitespace at either end of a field value (a peer rejects the call).
    for spaced in (" v", "v ", "  "):
        with pytest.raises(ValueError, match="whitespace"):
            encode_metadata({"x-spaced": spaced})
    assert encode_metadata({"x-inner": "a b"}) == [(b"x-inner", b"a b")]


def test_grpc_message_percent_encoding() -> None:
    text = "ünïcode 100% \n done"
    encoded = encode_grpc_message(text)
    assert encoded == b"%C3%BCn%C3%AFcode 100%25 %0A done"
    assert decode_grpc_message(encoded) == text
    assert decode_grpc_message(b"bad %zz escape") == "bad %zz escape"


def test_gzip_limits() -> None:
    assert decompress("gzip", compress("gzip", b"abc" * 100), 300) == b"abc" * 100
    assert decompress("gzip", gzip.compress(b"interop"), 100) == b"interop"
    with pytest.raises(DecompressedTooLarge):
        decompress("gzip", compress("gzip", b"\x00" * 1000), 999)
    with pytest.raises(DecompressionError):
        decompress("gzip", b"not gzip", 100)
    with pytest.raises(DecompressionError):
        decompress("gzip", compress("gzip", b"abc")[:-3], 100)


def test_codecs() -> None:
    codec = ProtoCodec()
    data = codec.encode(StringValue(value="v"), StringValue)
    assert codec.decode(data, StringValue).value == "v"
    with pytest.raises(TypeError):
        codec.encode(StringValue(value="v"), error_details_pb2.BadRequest)
    details = ProtoStatusDetailsCodec()
    blob = details.encode(Status.NOT_FOUND, "gone", [error_details_pb2.ResourceInfo(resource_name="r")])
    (decoded,) = details.decode(Status.NOT_FOUND, "gone", blob)
    assert isinstance(decoded, error_details_pb2.ResourceInfo) and decoded.resource_name == "r"


def test_grpc_error() -> None:
    error = GRPCError(Status.NOT_FOUND, "missing")
    assert error.status is Status.NOT_FOUND and str(error) == "NOT_FOUND: missing"
    assert GRPCError(5).status is Status.NOT_FOUND
    assert [s.value for s in Status] == list(range(17))


def test_receiving_frames_formats_no_frame_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    # h2 formats repr(frame) for a trace log on every frame it receives (for DATA, a hex dump
    # of a copy of the payload: a quarter of the CPU of a large message); ours does not.
    import hyperframe.frame

    from app_kit.rpc.server import ServerConnection
    from app_kit.wire.config import Configuration

    from .frames import HANDSHAKE, PING, WINDOW_UPDATE, frame

    def no_repr(self: object) -> str:
        raise AssertionError("a frame's repr was formatted")

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", no_repr)
    server = ServerConnection(Configuration())
    server.initiate()
    events = server.receive_data(
        HANDSHAKE + frame(PING, 0, 0, bytes(8)) + frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big"))
    )
    assert not any(type(event).__name__ == "ConnectionClosed" for event in events), events


def test_limits_from_the_environment_reach_the_server_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_MAX_RECEIVE_MESSAGE_LENGTH", str(2 * 1024 * 1024))
    monkeypatch.setenv("APP_MAX_CONNECTION_RECEIVE_BUFFER", str(8 * 1024 * 1024))
    monkeypatch.setenv("APP_MAX_CONNECTION_INFLATED_BYTES", str(6 * 1024 * 1024))
    config = load_settings(AppSettings).server_config()
    assert config.max_receive_message_length == 2 * 1024 * 1024
    assert config.max_connection_receive_buffer == 8 * 1024 * 1024
    assert config.max_connection_inflated_bytes == 6 * 1024 * 1024


def test_stream_transitions_by_input_match_h2s_state_machine() -> None:
    # The hot paths advance h2's stream state machine from h2's own table split by input
    # (h2_internals._advance): every state and input gives what process_input gives.
    import h2.exceptions
    import h2.stream

    from app_kit.wire import h2_internals

    def outcome(advance) -> tuple[object, ...]:  # type: ignore[no-untyped-def]
        machine = h2.stream.H2StreamStateMachine(1)
        machine.state = state
        machine.client = client
        try:
            events = advance(machine)
        except h2.exceptions.ProtocolError as exc:
            return ("error", str(exc), machine.state)
        return (
            # (h2 before 4.3 returns None, not [], from some side effects: so do we)
            None
            if events is None
            else [(type(event).__name__, sorted(vars(event).items(), key=str)) for event in events],
            machine.state,
            vars(machine),
        )

    checked = 0
    for stream_input, transitions in h2_internals._STREAM_TRANSITIONS.items():
        for state in h2.stream.StreamState:
            for client in (True, False):
                ours = outcome(lambda machine: h2_internals._advance(machine, transitions, stream_input))  # noqa: B023
                theirs = outcome(lambda machine: machine.process_input(stream_input))  # noqa: B023
                assert repr(ours) == repr(theirs), (stream_input, state, client)
                checked += 1
    assert checked == 2 * len(h2.stream.StreamState) * len(h2.stream.StreamInputs)
