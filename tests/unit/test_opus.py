"""libopus called directly: its settings reach it, its packets decode, misuse is refused."""

from __future__ import annotations

import ctypes.util
from array import array

import av
import pytest

from tests.unit.test_audio import voice
from voxrelay.service import opus
from voxrelay.service.opus import OpusEncoder

RATE = 24000
LOWDELAY = {"application": "lowdelay", "compression_level": "3"}


def packets(encoder: OpusEncoder, pcm: bytes) -> list[bytes]:
    step = encoder.frame_bytes
    return [encoder.encode(pcm[i : i + step]) for i in range(0, len(pcm) - step + 1, step)]


def test_packets_decode_to_the_frames_fed() -> None:
    encoder = OpusEncoder(RATE, 24000, LOWDELAY)
    made = packets(encoder, voice(RATE, 1.0))
    encoder.close()

    decoder = av.CodecContext.create("opus", "r")
    assert isinstance(decoder, av.AudioCodecContext)
    decoded = [frame for packet in made for frame in decoder.decode(av.Packet(packet))]

    samples = array("f")
    for frame in decoded:
        assert frame.format.name in ("flt", "fltp")  # mono: one plane either way
        samples.frombytes(bytes(frame.planes[0])[: frame.samples * 4])
    assert len(made) == 50
    assert len(samples) == 50 * 960  # 20 ms each, at 48 kHz
    assert max(map(abs, samples)) > 0.05


def test_the_application_reaches_libopus() -> None:
    """CELT alone (lowdelay) looks 2.5 ms ahead; ``audio`` adds SILK's 4 ms."""
    lowdelay = OpusEncoder(RATE, 24000, LOWDELAY)
    audio = OpusEncoder(RATE, 24000, {"application": "audio"})

    assert lowdelay.lookahead == RATE // 400
    assert audio.lookahead == RATE // 400 + RATE // 250


def test_constant_bitrate_makes_packets_of_one_size() -> None:
    """``vbr`` off: every 20 ms packet is the bit rate's share, so the option reaches it."""
    encoder = OpusEncoder(RATE, 24000, {**LOWDELAY, "vbr": "off"})
    variable = OpusEncoder(RATE, 24000, LOWDELAY)
    pcm = voice(RATE, 1.0)

    assert {len(p) for p in packets(encoder, pcm)} == {24000 // 8 // 50}
    assert len({len(p) for p in packets(variable, pcm)}) > 1


def test_the_complexity_reaches_libopus() -> None:
    pcm = voice(RATE, 1.0)
    low = packets(OpusEncoder(RATE, 24000, {**LOWDELAY, "compression_level": "0"}), pcm)
    high = packets(OpusEncoder(RATE, 24000, {**LOWDELAY, "compression_level": "10"}), pcm)

    assert low != high


@pytest.mark.parametrize(
    "options",
    [{"application": "no-such"}, {"vbr": "sometimes"}, {"bitrate": "24000"}],
)
def test_an_unknown_setting_is_refused(options: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        OpusEncoder(RATE, 24000, options)


def test_a_rate_libopus_does_not_take_is_refused() -> None:
    with pytest.raises(RuntimeError, match="libopus"):
        OpusEncoder(22050, 24000, LOWDELAY)


def test_only_whole_frames_are_taken_and_a_closed_encoder_takes_none() -> None:
    encoder = OpusEncoder(RATE, 24000, LOWDELAY)
    with pytest.raises(ValueError):
        encoder.encode(b"\x00\x00" * (encoder.frame_samples - 1))

    encoder.close()
    encoder.close()

    with pytest.raises(RuntimeError):
        encoder.encode(bytes(encoder.frame_bytes))


def test_without_pyavs_copy_the_systems_libopus_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    if ctypes.util.find_library("opus") is None:
        pytest.skip("no system libopus (Debian: libopus0)")
    monkeypatch.setattr(opus, "_bundled", list)
    opus.library.cache_clear()
    try:
        encoder = OpusEncoder(RATE, 24000, LOWDELAY)
        assert "av.libs" not in str(opus.library()._name)
        assert len(packets(encoder, voice(RATE, 0.2))) == 10
    finally:
        opus.library.cache_clear()
