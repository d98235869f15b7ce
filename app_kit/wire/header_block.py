"""HPACK for the hot path: a header encoder, and a decoder that remembers repeated blocks.

**Encoder.** A few fields are indexed once, everything else is literal.

hpack's general encoder indexes every field it may, so the same header list encodes to
different bytes each time and costs dozens of Python calls per block. A gRPC server sends
the same few fields on every call (``content-type``, ``grpc-accept-encoding``,
``grpc-status: 0``), a client the same request head for each method it calls. This encoder
enters only those into the dynamic table (RFC 7541 §2.3.2), each once, so after the first
call of a connection their blocks never change and are served from a cache. Every other
field is a literal without indexing (§6.2.2): it costs the peer no table space and leaves
the table, and thus the cache, as it is.

Nothing is ever evicted: a field is entered only while the whole table still fits the
size the peer allows. When the peer changes that size (SETTINGS_HEADER_TABLE_SIZE), the
next block starts with size updates to 0 and to the new size (§4.2), which empties the
peer's table, and the fields are entered again as they are used.

Strings are sent without Huffman coding: it would save a few bytes on rare fields at the
price of Python work on every one.

**Decoder.** Clients send the same request headers again and again, and once their fields
are in the dynamic table the block is the same bytes every time: a handful of indices.
:class:`~app_kit.wire.h2_internals.MemoizingHeaderDecoder` (it works on hpack's internals,
so it lives with the rest of them) remembers what such a block decoded to, as long as the
table is the one it was decoded against.
"""

from __future__ import annotations

from collections.abc import Iterable

from .h2_internals import HPACK_STATIC_TABLE

__all__ = ["HeaderBlockEncoder"]

_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HPACK_STATIC_TABLE
#: (name, value) -> index of the static entry holding both.
_STATIC_FIELDS = {field: index for index, field in enumerate(_STATIC_TABLE, 1)}
#: name -> index of the first static entry with that name.
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(_STATIC_TABLE, 1):
    _STATIC_NAMES.setdefault(_name, _index)
_DYNAMIC_BASE = len(_STATIC_TABLE) + 1  # RFC 7541 §2.3.3: the newest dynamic entry
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
_DEFAULT_TABLE_SIZE = 4096  # RFC 9113 §6.5.2, the initial SETTINGS_HEADER_TABLE_SIZE
_CACHE_LIMIT = 64


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1: ``value`` with an N-bit prefix, the high bits of the first byte ``first``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    """RFC 7541 §5.2: a string literal, not Huffman coded."""
    return _integer(len(value), 7, 0x00) + value


def _literal(name: bytes, value: bytes, prefix_bits: int, pattern: int) -> bytes:
    """RFC 7541 §6.2: a literal field, its name indexed in the static table where it can be."""
    name_index = _STATIC_NAMES.get(name)
    if name_index is None:
        return bytes((pattern,)) + _string(name) + _string(value)
    return _integer(name_index, prefix_bits, pattern) + _string(value)


class HeaderBlockEncoder:
    """Encodes header lists into HPACK blocks; h2 may use it as its connection's encoder.

    ``indexed`` are the fields that go into the dynamic table (on first use); all others are
    sent as literals that are never indexed by the peer's table.
    """

    def __init__(self, indexed: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._indexable = set(indexed)
        # Entered fields in the order they were entered (the last is the newest entry).
        self._entries: dict[tuple[bytes, bytes], int] = {}
        self._table_size = _DEFAULT_TABLE_SIZE
        self._table_used = 0
        self._size_update: bytes = b""
        self._cache: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    @property
    def header_table_size(self) -> int:
        """The dynamic table size the peer allows (h2 sets it from the peer's SETTINGS)."""
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, size: int) -> None:
        if size == self._table_size:
            return
        self._table_size = size
        self._entries.clear()
        self._table_used = 0
        self._cache.clear()
        # Empty the peer's table, then allow it the new size.
        self._size_update = _integer(0, 5, 0x20) + (_integer(size, 5, 0x20) if size else b"")

    def allow_indexing(self, field: tuple[bytes, bytes]) -> None:
        """Let ``field`` enter the dynamic table too (a client's ``:path`` of each method it calls)."""
        self._indexable.add(field)

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """One header block for ``headers`` (name and value as bytes)."""
        block = bytearray(self._size_update)
        self._size_update = b""
        entries = self._entries
        for field in headers:
            name, value = field
            static = _STATIC_FIELDS.get((name, value))
            if static is not None:
                block.append(0x80 | static)  # all static indices are below 127
                continue
            position = entries.get((name, value))
            if position is not None:
                block += _integer(_DYNAMIC_BASE + len(entries) - 1 - position, 7, 0x80)
            elif (name, value) in self._indexable and self._fits(name, value):
                entries[(name, value)] = len(entries)
                self._table_used += len(name) + len(value) + _ENTRY_OVERHEAD
                self._cache.clear()  # the indices of older entries moved
                block += _literal(name, value, 6, 0x40)  # §6.2.1, with incremental indexing
            else:
                block += _literal(name, value, 4, 0x00)  # §6.2.2, without indexing
        return bytes(block)

    def encode_cached(self, headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
        """:meth:`encode`, remembered for constant header lists while the table holds still."""
        block = self._cache.get(headers)
        if block is None:
            before = (len(self._entries), self._size_update)
            block = self.encode(headers)
            if before == (len(self._entries), b"") and len(self._cache) < _CACHE_LIMIT:
                self._cache[headers] = block  # the same bytes next time
        return block

    def _fits(self, name: bytes, value: bytes) -> bool:
        return self._table_used + len(name) + len(value) + _ENTRY_OVERHEAD <= self._table_size
