"""The Ogg page writer alone, read back by ffmpeg's Ogg demuxer and by a parser here."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import av
import pytest

from voxrelay.service.ogg import OggWriter, ogg_crc


@dataclass(frozen=True)
class Page:
    flags: int
    granule: int
    serial: int
    sequence: int
    crc: int
    lacing: bytes
    body: bytes

    def packets(self) -> list[bytes]:
        out, at, size = [], 0, 0
        for value in self.lacing:
            size += value
            if value < 255:
                out.append(self.body[at : at + size])
                at, size = at + size, 0
        return out


def parse(data: bytes) -> list[tuple[Page, bytes]]:
    """Each page of *data* and its raw bytes."""
    pages, at = [], 0
    while at < len(data):
        capture, version, flags, granule, serial, sequence, crc, count = struct.unpack_from(
            "<4sBBqIIIB", data, at
        )
        assert (capture, version) == (b"OggS", 0)
        lacing = data[at + 27 : at + 27 + count]
        size = 27 + count + sum(lacing)
        raw = data[at : at + size]
        pages.append((Page(flags, granule, serial, sequence, crc, lacing, raw[27 + count :]), raw))
        at += size
    assert at == len(data)
    return pages


def test_the_crc_is_the_one_ffmpegs_muxer_writes() -> None:
    out = io.BytesIO()
    with av.open(out, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=24000)
        stream.layout, stream.format = "mono", "s16"
        frame = av.AudioFrame(format="s16", layout="mono", samples=4800)
        frame.planes[0].update(bytes(range(256)) * 37 + bytes(9600 - 256 * 37))
        frame.sample_rate, frame.pts = 24000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    pages = parse(out.getvalue())
    assert len(pages) >= 3
    for page, raw in pages:
        assert ogg_crc(raw[:22] + bytes(4) + raw[26:]) == page.crc


def test_known_crcs() -> None:
    # Ogg's CRC (polynomial 0x04C11DB7, no reflection, initial value 0, no final XOR) is
    # POSIX cksum's CRC-32 (check value 0x765E7680) without its final inversion.
    assert ogg_crc(b"") == 0
    assert ogg_crc(b"123456789") == 0x89A1897F


def test_pages_carry_packets_whole_with_their_flags_granules_and_sequence() -> None:
    writer = OggWriter(serial=0x1234)
    packets = [b"a" * 10, b"b" * 255, b"c" * 600, b""]
    data = writer.pages([(b"head", 0)])
    data += writer.pages([(p, 100 * (i + 1)) for i, p in enumerate(packets)])
    data += writer.pages([(b"end", 450)], last=True)

    pages = parse(data)
    assert [page.flags for page, _ in pages] == [0x02, 0, 0x04]
    assert [page.sequence for page, _ in pages] == [0, 1, 2]
    assert {page.serial for page, _ in pages} == {0x1234}
    assert [page.granule for page, _ in pages] == [0, 400, 450]
    assert pages[1][0].lacing == bytes([10, 255, 0, 255, 255, 90, 0])
    assert pages[1][0].packets() == packets
    for page, raw in pages:
        assert ogg_crc(raw[:22] + bytes(4) + raw[26:]) == page.crc


def test_packets_past_255_lacing_values_go_on_the_next_page() -> None:
    writer = OggWriter()
    packets = [(bytes([i % 256]) * 300, i) for i in range(200)]  # two lacing values each

    pages = parse(writer.pages(packets, last=True))

    assert [len(page.lacing) for page, _ in pages] == [254, 146]
    assert [page.granule for page, _ in pages] == [126, 199]
    assert [page.flags for page, _ in pages] == [0x02, 0x04]
    assert [p for page, _ in pages for p in page.packets()] == [p for p, _ in packets]


def test_the_end_of_a_stream_whose_last_packet_is_out_is_a_page_of_its_own() -> None:
    writer = OggWriter()
    writer.pages([(b"x", 7)])

    ((page, _),) = parse(writer.pages([], last=True))

    assert (page.flags, page.granule, page.sequence, page.lacing) == (0x04, 7, 1, b"")


def test_a_packet_longer_than_a_page_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than one page"):
        OggWriter().pages([(bytes(255 * 255), 0)])
