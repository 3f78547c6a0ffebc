"""Write Ogg pages (RFC 3533) for one logical stream as its packets come (sans-I/O).

Each call to :meth:`OggWriter.pages` puts the packets it is given on pages at once, as few
as hold them: nothing is held back for packets still to come, so a stream's bytes are
final as soon as its packets are.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Sequence

__all__ = ["OggWriter", "ogg_crc"]

#: Each byte with its bits in reverse order.
_BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))

_HEADER = struct.Struct("<4sBBqIIIB")
_CAPTURE = b"OggS"
#: Header-type flags: the stream's first page, its last (no packet here spans pages).
_FIRST, _LAST = 0x02, 0x04
#: Lacing values a page holds at most.
_MAX_SEGMENTS = 255


def ogg_crc(data: bytes) -> int:
    """Return Ogg's CRC-32 of *data*: polynomial 0x04C11DB7, not reflected, no inversions.

    zlib's CRC-32 uses the same polynomial reflected: over the bit-reversed bytes, with its
    initial and final inversions undone, it gives the Ogg CRC with its bits reversed.
    """
    reflected = zlib.crc32(data.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int.from_bytes(reflected.to_bytes(4, "little").translate(_BIT_REVERSED), "big")


def _lacing(packet: bytes) -> bytes:
    """A packet's lacing values: 255 for each whole 255 bytes, then the rest (maybe 0)."""
    return b"\xff" * (len(packet) // 255) + bytes((len(packet) % 255,))


class OggWriter:
    """Write the pages of one logical Ogg stream (its serial number chosen at random)."""

    def __init__(self, serial: int | None = None) -> None:
        self._serial = random.getrandbits(32) if serial is None else serial
        self._sequence = 0
        self._started = False
        self._granule = 0  # the last page's

    def pages(self, packets: Sequence[tuple[bytes, int]], *, last: bool = False) -> bytes:
        """Return pages holding *packets* whole, in order: each a packet and the stream's
        granule position once that packet is complete.

        A page's granule position is its last packet's. The stream's first page is marked
        as its beginning; with *last*, the final page is marked as its end (a page of no
        packets, with *last* and nothing else to write, ends a stream whose last packet
        already went out, at the granule position of that packet).
        """
        out = bytearray()
        laced = [(packet, _lacing(packet), granule) for packet, granule in packets]
        while laced or (last and not out):
            count = segments = 0
            while count < len(laced) and segments + len(laced[count][1]) <= _MAX_SEGMENTS:
                segments += len(laced[count][1])
                count += 1
            if laced and not count:
                raise ValueError("an Ogg packet longer than one page is not supported")
            on_page, laced = laced[:count], laced[count:]
            flags = 0 if self._started else _FIRST
            if last and not laced:
                flags |= _LAST
            granule = on_page[-1][2] if on_page else self._granule
            out += self._page(on_page, granule, flags)
        return bytes(out)

    def _page(self, packets: Sequence[tuple[bytes, bytes, int]], granule: int, flags: int) -> bytes:
        table = b"".join(lacing for _, lacing, _ in packets)
        header = _HEADER.pack(
            _CAPTURE, 0, flags, granule, self._serial, self._sequence, 0, len(table)
        )
        page = b"".join((header, table, *(packet for packet, _, _ in packets)))
        crc = ogg_crc(page)
        self._started = True
        self._sequence += 1
        self._granule = granule
        return page[:22] + crc.to_bytes(4, "little") + page[26:]
