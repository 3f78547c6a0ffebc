"""Tests for the stream encoder: what a client decodes from the concatenated bytes."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import shutil
import struct
import subprocess
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import av.logging
import pytest

from tests.unit.test_ogg import parse
from voxrelay.service import audio
from voxrelay.service.audio import StreamEncoder, format_info, output_rate
from voxrelay.service.errors import InvalidRequest
from voxrelay.service.model import AudioFormat

SECONDS = 2.0
INPUT_RATES = (22050, 24000)
# What PyAV/ffmpeg calls each format's demuxer; raw ones also need a rate and layout.
DEMUXERS = {
    AudioFormat.PCM: "s16le",
    AudioFormat.WAV: "wav",
    AudioFormat.MP3: "mp3",
    AudioFormat.OPUS: "ogg",
    AudioFormat.FLAC: "flac",
    AudioFormat.AAC: "aac",
    AudioFormat.MULAW: "mulaw",
    AudioFormat.ALAW: "alaw",
}
RAW = {AudioFormat.PCM, AudioFormat.MULAW, AudioFormat.ALAW}
# mp3 and ADTS cannot tell a decoder to drop the codec's priming and padding samples, so
# their audio comes out up to 100 ms (5 % of the 2 s streams) longer; every other format
# decodes to exactly what went in.
PRIMED = {AudioFormat.MP3, AudioFormat.AAC}
# Irregular chunk sizes, odd ones included, so samples straddle calls.
CHUNK_SIZES = (1, 777, 4096, 33, 10001, 2, 5, 2999)


def _pcm(samples: Iterator[float]) -> bytes:
    values = [max(-32768, min(32767, round(v))) for v in samples]
    return struct.pack(f"<{len(values)}h", *values)


@functools.cache
def tone(rate: int, seconds: float = SECONDS) -> bytes:
    """Return a 440 Hz sine as s16le mono."""
    n = int(rate * seconds)
    return _pcm(8000 * math.sin(2 * math.pi * 440 * i / rate) for i in range(n))


@functools.cache
def voice(rate: int, seconds: float = SECONDS) -> bytes:
    """Return something speech-like: a gliding pitch with harmonics, syllables and a pause."""

    def sample(i: int) -> float:
        t = i / rate
        if 0.9 < t < 1.1:
            return 0.0
        f0 = 150 + 50 * math.sin(2 * math.pi * 0.8 * t)
        phase = 2 * math.pi * (150 * t - 50 / (2 * math.pi * 0.8) * math.cos(2 * math.pi * 0.8 * t))
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)
        harmonics = sum(math.sin(h * phase) / h for h in range(1, 6) if h * f0 < rate / 2)
        return 6000 * envelope * harmonics

    return _pcm(sample(i) for i in range(int(rate * seconds)))


SIGNALS: dict[str, Callable[[int], bytes]] = {"tone": tone, "voice": voice}


def chunks(data: bytes) -> Iterator[bytes]:
    """Split ``data`` into irregular pieces."""
    start, k = 0, 0
    while start < len(data):
        size = CHUNK_SIZES[k % len(CHUNK_SIZES)]
        yield data[start : start + size]
        start, k = start + size, k + 1


def encode_all(encoder: StreamEncoder, pcm: bytes) -> tuple[bytes, bytes]:
    """Feed ``pcm`` in irregular chunks; return (bytes before flush, bytes of flush)."""
    before = b"".join(encoder.encode(piece) for piece in chunks(pcm))
    return before, encoder.flush()


@dataclass(frozen=True)
class Decoded:
    sample_rate: int
    channels: int
    samples: int
    rms: float

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate


def decode(data: bytes, fmt: AudioFormat, rate: int) -> Decoded:
    """Decode a whole stream with PyAV, failing on any error ffmpeg reports."""
    options = {"sample_rate": str(rate), "ch_layout": "mono"} if fmt in RAW else {}
    to_s16 = av.AudioResampler(format="s16")
    samples, energy, sample_rate, channels = 0, 0.0, 0, 0
    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with (
            av.logging.Capture() as logs,
            av.open(io.BytesIO(data), "r", format=DEMUXERS[fmt], options=options) as container,
        ):
            for frame in container.decode(audio=0):
                sample_rate, channels = frame.sample_rate, len(frame.layout.channels)
                for converted in to_s16.resample(frame):
                    values = array("h", bytes(converted.planes[0]))[: converted.samples]
                    samples += converted.samples
                    energy += sum(v * v for v in values)
    finally:
        av.logging.set_level(level)
    assert not [log for log in logs if log[0] <= av.logging.ERROR], logs
    assert samples, "nothing decoded"
    return Decoded(sample_rate, channels, samples, math.sqrt(energy / samples))


def assert_duration(decoded: Decoded, fmt: AudioFormat, seconds: float) -> None:
    if fmt in PRIMED:
        assert seconds <= decoded.duration <= seconds + 0.1
    else:
        assert decoded.duration == pytest.approx(seconds, abs=0.005)


def expected_rate(fmt: AudioFormat, input_rate: int) -> int:
    return {AudioFormat.OPUS: 48000, AudioFormat.MULAW: 8000, AudioFormat.ALAW: 8000}.get(
        fmt, input_rate
    )


# Round trips


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("input_rate", INPUT_RATES)
@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_stream_decodes_to_the_same_audio(fmt: AudioFormat, input_rate: int, signal: str) -> None:
    rate = output_rate(fmt, input_rate, 0)
    encoder = StreamEncoder(fmt, input_rate=input_rate, output_rate=rate)
    before, tail = encode_all(encoder, SIGNALS[signal](input_rate))

    decoded = decode(before + tail, fmt, rate)

    assert rate == encoder.sample_rate == expected_rate(fmt, input_rate)
    assert decoded.sample_rate == rate
    assert decoded.channels == encoder.channels == 1
    assert_duration(decoded, fmt, SECONDS)
    assert decoded.rms > 1000


@pytest.mark.parametrize(
    "fmt",
    [AudioFormat.PCM, AudioFormat.WAV, AudioFormat.FLAC, AudioFormat.MULAW, AudioFormat.MP3],
)
def test_stream_is_resampled_to_the_requested_rate(fmt: AudioFormat) -> None:
    rate = output_rate(fmt, 24000, 16000)
    encoder = StreamEncoder(fmt, input_rate=24000, output_rate=rate)
    before, tail = encode_all(encoder, voice(24000))

    decoded = decode(before + tail, fmt, rate)

    assert rate == encoder.sample_rate == decoded.sample_rate == 16000
    assert_duration(decoded, fmt, SECONDS)
    assert decoded.rms > 1000


def test_pcm_at_its_own_rate_passes_through_byte_for_byte() -> None:
    pcm = voice(24000, 0.1)
    encoder = StreamEncoder(AudioFormat.PCM, input_rate=24000, output_rate=24000)

    out = b"".join(encoder.encode(pcm[i : i + 1]) for i in range(len(pcm)))

    assert out + encoder.flush() == pcm


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_a_very_short_stream_is_still_valid(fmt: AudioFormat) -> None:
    rate = output_rate(fmt, 24000, 0)
    encoder = StreamEncoder(fmt, input_rate=24000, output_rate=rate)

    before, tail = encode_all(encoder, tone(24000, 0.03))

    assert decode(before + tail, fmt, rate).rms > 1000


@pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI: `make test-deps` installs it"
)
@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_ffmpeg_cli_decodes_the_stream_without_complaint(fmt: AudioFormat, tmp_path: Path) -> None:
    rate = output_rate(fmt, 22050, 0)
    encoder = StreamEncoder(fmt, input_rate=22050, output_rate=rate)
    before, tail = encode_all(encoder, voice(22050))
    path = tmp_path / f"stream.{fmt}"
    path.write_bytes(before + tail)
    raw = ["-f", DEMUXERS[fmt], "-ar", str(rate), "-ac", "1"] if fmt in RAW else []

    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", *raw, "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0
    assert result.stderr == ""


# Streaming


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_audio_comes_out_as_it_goes_in(fmt: AudioFormat) -> None:
    rate = output_rate(fmt, 24000, 0)
    encoder = StreamEncoder(fmt, input_rate=24000, output_rate=rate)
    pcm = voice(24000, 1.0)
    step = 24000 * 2 // 50  # 20 ms chunks, as an engine might deliver them

    outputs = [encoder.encode(pcm[i : i + step]) for i in range(0, len(pcm), step)]
    before = sum(map(len, outputs))
    tail = len(encoder.flush())

    assert sum(1 for out in outputs if out) >= 5
    assert before > tail


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_nothing_is_written_before_the_first_samples(fmt: AudioFormat) -> None:
    rate = output_rate(fmt, 24000, 0)
    encoder = StreamEncoder(fmt, input_rate=24000, output_rate=rate)

    assert encoder.encode(b"") == b""
    assert encoder.encode(b"\x10") == b""  # half a sample
    first = encoder.encode(b"\x00" + tone(24000, 0.5))
    before, tail = encode_all(encoder, tone(24000, 0.5))

    assert first  # the header, at least, once there is audio
    assert_duration(decode(first + before + tail, fmt, rate), fmt, 1.0 + 1 / 24000)


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_an_empty_stream_flushes_to_nothing(fmt: AudioFormat) -> None:
    encoder = StreamEncoder(fmt, input_rate=24000, output_rate=output_rate(fmt, 24000, 0))

    assert encoder.encode(b"\x01") == b""
    assert encoder.flush() == b""
    assert encoder.flush() == b""


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_close_without_flush_is_safe_and_idempotent(fmt: AudioFormat) -> None:
    encoder = StreamEncoder(fmt, input_rate=24000, output_rate=output_rate(fmt, 24000, 0))
    encoder.encode(voice(24000, 0.5))

    encoder.close()
    encoder.close()

    assert encoder.flush() == b""
    with pytest.raises(RuntimeError):
        encoder.encode(b"\x00\x00")


def test_close_before_any_audio_is_safe() -> None:
    encoder = StreamEncoder(AudioFormat.OPUS, input_rate=24000, output_rate=48000)

    encoder.close()
    encoder.close()


# Rates and content types


@pytest.mark.parametrize(
    ("fmt", "input_rate", "requested", "expected"),
    [
        (AudioFormat.PCM, 24000, 0, 24000),
        (AudioFormat.WAV, 22050, 0, 22050),
        (AudioFormat.WAV, 24000, 16000, 16000),
        (AudioFormat.FLAC, 24000, 96000, 96000),
        (AudioFormat.MP3, 24000, 0, 24000),
        (AudioFormat.MP3, 22050, 44100, 44100),
        (AudioFormat.MP3, 96000, 0, 48000),
        (AudioFormat.AAC, 24000, 0, 24000),
        (AudioFormat.OPUS, 24000, 0, 48000),
        (AudioFormat.OPUS, 24000, 16000, 48000),
        (AudioFormat.MULAW, 24000, 0, 8000),
        (AudioFormat.ALAW, 24000, 16000, 16000),
    ],
)
def test_output_rate(fmt: AudioFormat, input_rate: int, requested: int, expected: int) -> None:
    assert output_rate(fmt, input_rate, requested) == expected


@pytest.mark.parametrize(
    ("fmt", "requested"),
    [
        (AudioFormat.OPUS, 44100),
        (AudioFormat.OPUS, 22050),
        (AudioFormat.MP3, 96000),
        (AudioFormat.MP3, 20000),
        (AudioFormat.AAC, 7000),
        (AudioFormat.WAV, 4000),
        (AudioFormat.WAV, 96000),
        (AudioFormat.PCM, -16000),
        (AudioFormat.FLAC, 192000),
        (AudioFormat.MULAW, 100),
    ],
)
def test_an_unsupported_rate_is_an_invalid_request(fmt: AudioFormat, requested: int) -> None:
    with pytest.raises(InvalidRequest, match=rf"{requested} is not supported for {fmt}"):
        output_rate(fmt, 24000, requested)


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        (AudioFormat.PCM, "audio/pcm"),
        (AudioFormat.WAV, "audio/wav"),
        (AudioFormat.MP3, "audio/mpeg"),
        (AudioFormat.OPUS, "audio/ogg; codecs=opus"),
        (AudioFormat.FLAC, "audio/flac"),
        (AudioFormat.AAC, "audio/aac"),
        (AudioFormat.MULAW, "audio/basic"),
        (AudioFormat.ALAW, "audio/x-alaw-basic"),
    ],
)
def test_content_type(fmt: AudioFormat, content_type: str) -> None:
    encoder = StreamEncoder(fmt, input_rate=24000, output_rate=output_rate(fmt, 24000, 0))

    assert format_info(fmt).content_type == encoder.content_type == content_type


def test_default_rates() -> None:
    defaults = {fmt: format_info(fmt).default_rate for fmt in AudioFormat}

    assert defaults == {
        AudioFormat.PCM: None,
        AudioFormat.WAV: None,
        AudioFormat.MP3: None,
        AudioFormat.OPUS: 48000,
        AudioFormat.FLAC: None,
        AudioFormat.AAC: None,
        AudioFormat.MULAW: 8000,
        AudioFormat.ALAW: 8000,
    }


# Settings made for speech


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        (AudioFormat.OPUS, {"application": "lowdelay", "compression_level": "3"}),
        (AudioFormat.MP3, {"quality": "7"}),
    ],
)
@pytest.mark.parametrize("input_rate", INPUT_RATES)
def test_speech_settings_are_used_decode_and_keep_duration(
    fmt: AudioFormat, options: dict[str, str], input_rate: int
) -> None:
    encoder = StreamEncoder(fmt, input_rate=input_rate, output_rate=output_rate(fmt, input_rate, 0))
    before, tail = encode_all(encoder, voice(input_rate))
    assert audio._ENCODINGS[fmt].codec_options == options

    decoded = decode(before + tail, fmt, encoder.sample_rate)

    assert_duration(decoded, fmt, SECONDS)
    assert decoded.rms > 1000


def test_a_codec_option_reaches_the_codec() -> None:
    """An option libopus refuses fails the stream: the options are not ignored."""
    saved = audio._ENCODINGS[AudioFormat.OPUS]
    audio._ENCODINGS[AudioFormat.OPUS] = dataclasses.replace(
        saved, codec_options={"application": "no-such-application"}
    )
    try:
        encoder = StreamEncoder(AudioFormat.OPUS, input_rate=24000, output_rate=48000)
        with pytest.raises((av.FFmpegError, ValueError)):
            encoder.encode(voice(24000))
        encoder.close()
    finally:
        audio._ENCODINGS[AudioFormat.OPUS] = saved


@pytest.mark.parametrize(("input_rate", "fed"), [(16000, 16000), (22050, 24000), (44100, 48000)])
def test_opus_is_fed_the_engines_rate_and_still_decodes_at_48k(input_rate: int, fed: int) -> None:
    encoder = StreamEncoder(AudioFormat.OPUS, input_rate=input_rate, output_rate=48000)
    before, tail = encode_all(encoder, voice(input_rate))
    data = before + tail

    # OpusHead (RFC 7845 5.1): the rate the encoder was fed, little-endian at offset 12.
    head = data.index(b"OpusHead")
    assert struct.unpack_from("<I", data, head + 12)[0] == fed
    decoded = decode(data, AudioFormat.OPUS, 48000)
    assert encoder.sample_rate == decoded.sample_rate == 48000
    assert_duration(decoded, AudioFormat.OPUS, SECONDS)
    assert decoded.rms > 1000


def test_each_opus_packet_goes_out_with_the_call_that_made_it() -> None:
    """No packet waits for the next: 200 ms fed in 20 ms calls decode to 200 ms less the
    encoder's look-ahead, and each call's bytes are whole Ogg pages."""
    encoder = StreamEncoder(AudioFormat.OPUS, input_rate=24000, output_rate=48000)
    pcm = voice(24000, 0.2)
    step = 24000 * 2 // 50

    outputs = [encoder.encode(pcm[i : i + step]) for i in range(0, len(pcm), step)]

    pages = [parse(out) for out in outputs]
    assert [len(p) for p in pages] == [3] + [1] * 9  # the two headers with the first
    assert all(len(page.packets()) == 1 for p in pages for page, _ in p[-1:])
    head = struct.unpack_from("<H", b"".join(outputs), b"".join(outputs).index(b"OpusHead") + 10)
    decoded = decode(b"".join(outputs), AudioFormat.OPUS, 48000)
    assert decoded.samples == 10 * 960 - head[0]


def test_an_opus_call_puts_all_it_made_on_one_page() -> None:
    encoder = StreamEncoder(AudioFormat.OPUS, input_rate=24000, output_rate=48000)
    encoder.encode(voice(24000, 0.1))

    ((page, _),) = parse(encoder.encode(voice(24000, 0.5)))

    assert len(page.packets()) == 25
    assert page.granule == 30 * 960


@pytest.mark.parametrize("input_rate", [24000, 16000])
def test_an_opus_stream_ends_where_its_audio_does(input_rate: int) -> None:
    """The end page's granule position trims the encoder's padding to the sample."""
    encoder = StreamEncoder(AudioFormat.OPUS, input_rate=input_rate, output_rate=48000)
    pcm = voice(input_rate, 1.0) + voice(input_rate, 0.01)[:14]  # 7 samples past a frame

    before, tail = encode_all(encoder, pcm)

    assert parse(tail)[-1][0].flags & 0x04  # the end of the stream
    decoded = decode(before + tail, AudioFormat.OPUS, 48000)
    assert decoded.samples == (input_rate + 7) * 48000 // input_rate


def test_the_lame_quality_reaches_lame() -> None:
    """LAME at another quality makes other frames: the setting is not ignored."""

    def mp3(quality: str) -> bytes:
        saved = audio._ENCODINGS[AudioFormat.MP3]
        audio._ENCODINGS[AudioFormat.MP3] = dataclasses.replace(
            saved, codec_options={"quality": quality}
        )
        try:
            encoder = StreamEncoder(AudioFormat.MP3, input_rate=24000, output_rate=24000)
            return b"".join(encode_all(encoder, voice(24000)))
        finally:
            audio._ENCODINGS[AudioFormat.MP3] = saved

    assert mp3("7") == mp3("7")
    assert mp3("2") != mp3("7")
