"""Reads frame headers ahead of h2 and counts what floods are made of.

h2 validates every frame, but it accepts any number of PINGs, SETTINGS, RST_STREAMs and
empty frames, and it assembles a header block from CONTINUATION frames before anything
checks its size. The guard sees each frame header as the bytes arrive (a few integer
operations per frame), so a flood is cut off before h2 or the application does any work for
it, and a header block is refused as soon as it grows past ``max_header_block_size``.

PINGs are judged by gRPC's keepalive enforcement (:class:`PingPolicy`) before any flood
limit: gRPC clients and servers PING whenever they receive data (BDP estimation), so a
PING that answers our own HEADERS or DATA is ordinary traffic, never abuse.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

from .config import Configuration
from .h2_internals import MAX_CONTINUATION_FRAMES

__all__ = ["AddressBudget", "FrameGuard", "PeerMisbehaved", "PingPolicy"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PING = 0x0, 0x1, 0x2, 0x3, 0x4, 0x6
_PUSH_PROMISE, _WINDOW_UPDATE, _CONTINUATION = 0x5, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
_NOT_PLAIN_HEADERS = _END_HEADERS | _PADDED | _PRIORITY_FLAG  # of these, END_HEADERS only
# A frame header's length (as 16 + 8 bits), type and flags, in one call rather than slices.
_FRAME_START = struct.Struct(">HBBB")
_PROTOCOL_ERROR, _FRAME_SIZE_ERROR, _ENHANCE_YOUR_CALM = 0x1, 0x6, 0xB
_LARGE_DATA = 1024  # a DATA frame this large licenses one crumb (see count_crumb)
_CRUMBS_BANKED = 1024  # at most this many licensed ahead

# What is counted per window, and which Configuration field limits it.
_PINGS, _SETTINGS_FRAMES, _EMPTY_FRAMES, _RESETS = range(4)
_LIMITS = (
    "max_pings_per_window",
    "max_settings_per_window",
    "max_empty_frames_per_window",
    "max_resets_per_window",
)
_WHAT = ("PING frames", "SETTINGS frames", "empty frames", "stream resets")


class PeerMisbehaved(Exception):
    """The peer broke the protocol or flooded us: close with ``error_code``."""

    def __init__(self, error_code: int, reason: str, debug: bytes = b"") -> None:
        super().__init__(reason)
        self.error_code = error_code
        self.reason = reason
        #: Opaque data for the GOAWAY (what gRPC peers log), e.g. ``b"too_many_pings"``.
        self.debug = debug


class PingPolicy:
    """gRPC's keepalive enforcement: how a server tells keepalive and BDP PINGs from abuse.

    A PING that comes sooner than the permitted interval since the previous one —
    ``min_ping_interval`` while calls are open, ``min_ping_interval_without_calls`` when there
    are none — is a strike, and the strike after ``max_ping_strikes`` ends the connection
    with GOAWAY ENHANCE_YOUR_CALM ``too_many_pings``. A *licensed* PING is never a strike and
    clears them: gRPC resets the strikes whenever the server sends HEADERS or DATA; here each
    HEADERS or DATA frame we send licenses one PING, so a peer that answers every frame it
    receives with a PING (BDP estimation, eagerly) is served for as long as it likes, and can
    never make us do more work for PINGs than we chose to do for it.
    """

    __slots__ = ("_last", "_min_interval", "_min_interval_idle", "_strikes", "max_strikes")

    def __init__(self, config: Configuration) -> None:
        self._min_interval = config.min_ping_interval
        self._min_interval_idle = config.min_ping_interval_without_calls
        self.max_strikes = config.max_ping_strikes
        self._strikes = 0
        self._last = -math.inf

    def too_many(self, now: float, *, active: bool, licensed: bool) -> bool:
        """Judge a PING received at ``now``; True: the peer has used up its strikes."""
        if not self.max_strikes:
            return False
        last, self._last = self._last, now
        if licensed:
            self._strikes = 0
            return False
        if now - last >= (self._min_interval if active else self._min_interval_idle):
            return False
        self._strikes += 1
        return self._strikes > self.max_strikes


class AddressBudget:
    """Stream resets counted across every connection from one peer address: an attacker that
    spreads a rapid reset over many connections stays under each one's limit, not under this
    (``max_resets_per_window_per_address``). Shared by those connections' guards."""

    __slots__ = ("connections", "count", "window_start")

    def __init__(self) -> None:
        #: Connections from the address that share it (it is dropped with the last).
        self.connections = 0
        self.count = 0
        self.window_start = -math.inf


class FrameGuard:
    """Tracks frame boundaries in the incoming byte stream and enforces the flood limits.

    Frames that carry nothing for us — empty DATA, HEADERS and CONTINUATION, PRIORITY (which
    gRPC never uses), frames of a type we do not know (ignored, as RFC 9113 §5.5 says),
    WINDOW_UPDATEs that no DATA frame of ours called for, and PING or SETTINGS
    acknowledgements of nothing we sent (the connection says what it sends: :meth:`ping_sent`,
    :meth:`settings_sent`) — share the ``max_empty_frames_per_window`` budget.
    ``reset_licensed`` answers, for each RST_STREAM, whether it cancels a stream we had
    already finished (its reset crossed our answer: no rapid reset). ``update_licensed``
    answers, for each WINDOW_UPDATE, whether our DATA licenses it (a peer may send two per
    DATA frame it gets: stream and connection). ``ping_context`` answers, for each PING
    received, whether one of our HEADERS or DATA frames licenses it and whether calls are
    open (see :class:`PingPolicy`); ``ping_policy`` None leaves out the strikes (gRPC
    enforces them on servers only).
    """

    __slots__ = (
        "_address_budget",
        "_address_limit",
        "_block",
        "_clock",
        "_continuations",
        "_counts",
        "_header",
        "_large_data",
        "_limits",
        "_max_block",
        "_max_frame",
        "_ping_context",
        "_ping_policy",
        "_pings_unanswered",
        "_preface_left",
        "_reset_licensed",
        "_settings_unanswered",
        "_skip",
        "_update_licensed",
        "_window",
        "_window_start",
        "carried_end",
        "carried_plain",
    )

    def __init__(
        self,
        config: Configuration,
        clock: Callable[[], float],
        *,
        expect_preface: bool,
        ping_context: Callable[[], tuple[bool, bool]] = lambda: (False, False),
        update_licensed: Callable[[], bool] = lambda: False,
        reset_licensed: Callable[[int], bool] = lambda stream_id: False,
        ping_policy: PingPolicy | None = None,
    ) -> None:
        self._clock = clock
        self._address_budget: AddressBudget | None = None
        self._address_limit = config.max_resets_per_window_per_address
        self._ping_context = ping_context
        self._update_licensed = update_licensed
        self._reset_licensed = reset_licensed
        # Our PINGs and SETTINGS not acknowledged yet: each licenses one ACK.
        self._pings_unanswered = 0
        self._settings_unanswered = 0
        self._ping_policy = ping_policy
        self._preface_left = PREFACE if expect_preface else b""
        self._header = b""  # an incomplete frame header carried over from the last chunk
        self._skip = 0  # payload bytes of the current frame still to come
        self._large_data = 0  # DATA frames of 1 KiB or more: each licenses a crumb (count_crumb)
        self._block = -1  # size of the header block being assembled, or -1
        self._continuations = 0  # CONTINUATION frames of that block so far
        #: Whether the frame that the last read left incomplete is a plain one (see :meth:`scan`).
        self.carried_plain = False
        #: Where in the last read the frame begun in an earlier one ended (see :meth:`scan`).
        self.carried_end = 0
        # The hard cap, on the compressed block here (h2_internals caps the decoded list); a list
        # over max_header_list_size but within it only costs its stream (see rpc/server.py).
        self._max_block = config.max_header_block_size
        self._max_frame = config.max_frame_size
        self._window = config.flood_window
        self._window_start = clock()
        self._counts = [0, 0, 0, 0]
        self._limits = tuple(getattr(config, name) for name in _LIMITS)

    def scan(self, data: bytes) -> tuple[list[int], int]:
        """Account for ``data``; raise :class:`PeerMisbehaved` if the peer must be cut off.

        Returns where in ``data`` the frames start that arrived whole in it and are plain —
        DATA without padding, HEADERS that are a whole header block without padding or
        priority, outside another header block: the connection may take those past h2's
        frame parser — and how many bytes of ``data`` end whole frames (the rest belongs to a
        frame still to be completed by later reads). :attr:`carried_plain` tells whether
        that frame is a plain one. If a frame begun in an earlier read ends whole in this
        one, :attr:`carried_end` says where.
        """
        base = 0
        if self._preface_left:
            size = len(data)
            data = self._check_preface(data)
            base = size - len(data)
        plain_frames: list[int] = []
        size = len(data)
        position = min(self._skip, size)
        self._skip -= position
        if self._skip:
            return plain_frames, base  # all of it continues a frame begun earlier
        if self._header:
            missing = 9 - len(self._header)
            self._header += data[position : position + missing]
            position += missing
            if len(self._header) < 9:
                return plain_frames, base
            # The header was split across reads: its payload follows in this one (or later).
            position += self._frame(self._header)
            self._header = b""
        self.carried_end = base + position
        start = -1  # where the last frame begun in this read starts
        plain = False
        unpack = _FRAME_START.unpack_from
        max_frame = self._max_frame
        while position + 9 <= size:
            end = position + 9
            high, low, kind, flags = unpack(data, position)
            length = high << 8 | low
            plain = self._block < 0  # before this frame: a frame inside a block is h2's to refuse
            if kind == _DATA and 0 < length <= max_frame:
                # A message's DATA (what most frames are): nothing to count (see _frame).
                plain = plain and not flags & _PADDED
                if length >= _LARGE_DATA:
                    self._large_data += 1
            elif (
                kind == _HEADERS
                and plain
                and flags & _NOT_PLAIN_HEADERS == _END_HEADERS
                and 0 < length <= max_frame
                and length <= self._max_block
            ):
                pass  # a whole header block: nothing to count or to remember (see _frame)
            else:
                length = self._frame(data[position:end])
                if plain:
                    if kind == _DATA:
                        plain = not flags & _PADDED
                    else:
                        plain = kind == _HEADERS and flags & _NOT_PLAIN_HEADERS == _END_HEADERS
            if plain and end + length <= size:
                plain_frames.append(base + position)
            start = position
            position = end + length
        if position < size:
            self._header = data[position:]
            self.carried_plain = False  # its header is split: left to h2
            return plain_frames, base + position
        if position > size:
            self._skip = position - size
            if start < 0:
                return plain_frames, base  # a frame whose header was split, still incomplete
            self.carried_plain = plain
            return plain_frames, base + start
        return plain_frames, base + size

    def _check_preface(self, data: bytes) -> bytes:
        expected = self._preface_left
        length = min(len(expected), len(data))
        if data[:length] != expected[:length]:
            raise PeerMisbehaved(_PROTOCOL_ERROR, "invalid connection preface: not an HTTP/2 client")
        self._preface_left = expected[length:]
        return data[length:]

    def _frame(self, header: bytes) -> int:
        """Check one frame header; return its payload length."""
        length = int.from_bytes(header[0:3], "big")
        if length > self._max_frame:
            # RFC 9113 §4.2; said now, before any of it is buffered (h2 would wait for all).
            raise PeerMisbehaved(_FRAME_SIZE_ERROR, f"frame of {length} bytes, over SETTINGS_MAX_FRAME_SIZE")
        kind = header[3]
        flags = header[4]
        if kind == _DATA:
            if not length and not flags & _END_STREAM:
                self._count(_EMPTY_FRAMES)
            elif length >= _LARGE_DATA:
                self._large_data += 1
        elif kind == _HEADERS or kind == _CONTINUATION or kind == _PUSH_PROMISE:
            if kind != _CONTINUATION:  # a block starts (PUSH_PROMISE's too: h2 assembles it)
                self._block = length
                self._continuations = 0
            elif self._block >= 0:
                self._block += length
                self._continuations += 1
                if self._continuations > MAX_CONTINUATION_FRAMES:
                    # RFC 9113 allows any number; h2 stops at 63 (nghttp2 at 8), where no real
                    # client goes (they split at the frame size): said plainly, as a flood.
                    raise PeerMisbehaved(
                        _ENHANCE_YOUR_CALM,
                        f"header block in more than {MAX_CONTINUATION_FRAMES} CONTINUATION frames",
                        b"too_many_continuation_frames",
                    )
            if not length:
                self._count(_EMPTY_FRAMES)
            if self._block > self._max_block:
                raise PeerMisbehaved(
                    _ENHANCE_YOUR_CALM,
                    f"header block over {self._max_block} bytes (max_header_block_size)",
                    b"header_block_too_large",
                )
            if flags & _END_HEADERS:
                self._block = -1
        elif kind == _PING:
            if not flags & _ACK:
                self._ping()
            elif self._pings_unanswered:
                self._pings_unanswered -= 1
            else:
                self._count(_EMPTY_FRAMES)  # it answers no PING of ours
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._count(_SETTINGS_FRAMES)
            elif length:
                # RFC 9113 §6.5 (h2 would call it a PROTOCOL_ERROR).
                raise PeerMisbehaved(_FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            elif self._settings_unanswered:
                self._settings_unanswered -= 1
            else:
                self._count(_EMPTY_FRAMES)  # it answers no SETTINGS of ours
        elif kind == _RST_STREAM:
            if not self._reset_licensed(int.from_bytes(header[5:9], "big") & 0x7FFFFFFF):
                self._count(_RESETS)
        elif kind == _WINDOW_UPDATE:
            if not self._update_licensed():
                self._count(_EMPTY_FRAMES)
        elif kind == _PRIORITY or kind > _CONTINUATION:
            self._count(_EMPTY_FRAMES)  # PRIORITY (gRPC has no use for it), or a type unknown
        return length

    def ping_sent(self) -> None:
        """We sent a PING: one PING ACK is owed to us."""
        self._pings_unanswered += 1

    def settings_sent(self) -> None:
        """We sent SETTINGS: one SETTINGS ACK is owed to us."""
        self._settings_unanswered += 1

    def count_empty(self) -> None:
        """A frame that carried nothing, found out after parsing (DATA of padding only)."""
        self._count(_EMPTY_FRAMES)

    def count_crumb(self) -> None:
        """A DATA frame of next to nothing inside a message (see rpc/connection.py): free if
        a DATA frame of 1 KiB or more came since the last one, else an empty frame. A proxy
        forwards what fills its buffers, and leaves such pieces between full frames (HAProxy:
        one frame in four, 56 to 63 bytes: 30 MiB in 10 s through it was cut off as a flood);
        a message sent in crumbs alone still costs the empty-frame budget."""
        if self._large_data:
            self._large_data = min(self._large_data, _CRUMBS_BANKED) - 1
        else:
            self._count(_EMPTY_FRAMES)

    def count_reset(self) -> None:
        """A stream reset the peer made us send (a refused or malformed request: "MadeYouReset",
        CVE-2025-8671): it costs the same budget as one the peer sends."""
        self._count(_RESETS)

    def forgive_reset(self) -> None:
        """A reset the peer sent was a cancellation of a call that was served (its handler ran):
        it does not count towards the rapid-reset budget, which is for streams opened and
        abandoned. Counted when its frame arrived, it is taken back now."""
        if self._counts[_RESETS]:
            self._counts[_RESETS] -= 1
        budget = self._address_budget
        if budget is not None and budget.count:
            budget.count -= 1

    def share_resets(self, budget: AddressBudget) -> None:
        """Count resets in ``budget`` too (every connection from the peer's address shares it)."""
        self._address_budget = budget

    def _ping(self) -> None:
        licensed, active = self._ping_context()
        self._count(_PINGS)
        policy = self._ping_policy
        if policy is not None and policy.too_many(self._clock(), active=active, licensed=licensed):
            raise PeerMisbehaved(
                _ENHANCE_YOUR_CALM,
                f"more than {policy.max_strikes} PINGs sooner than the permitted interval, with nothing sent to answer",
                b"too_many_pings",
            )

    def _count_address_reset(self, now: float) -> None:
        budget = self._address_budget
        assert budget is not None
        if now - budget.window_start >= self._window:
            budget.window_start, budget.count = now, 0
        budget.count += 1
        if budget.count > self._address_limit:
            raise PeerMisbehaved(
                _ENHANCE_YOUR_CALM,
                f"more than {self._address_limit} stream resets in {self._window:g}s from this address",
                b"flood",
            )

    def _count(self, what: int) -> None:
        now = self._clock()
        counts = self._counts
        if now - self._window_start >= self._window:
            self._window_start = now
            counts[:] = [0, 0, 0, 0]
        counts[what] += 1
        if what == _RESETS and self._address_budget is not None:
            self._count_address_reset(now)
        if counts[what] > self._limits[what]:
            debug = b"too_many_pings" if what == _PINGS else b"flood"
            raise PeerMisbehaved(
                _ENHANCE_YOUR_CALM,
                f"more than {self._limits[what]} {_WHAT[what]} in {self._window:g}s",
                debug,
            )
