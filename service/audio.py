"""Encode a stream of PCM incrementally into the audio format a client asked for.

Engines deliver s16le mono PCM; a :class:`StreamEncoder` turns it, chunk by chunk, into
bytes of the requested format: mp3 with LAME (through lameenc), opus with libopus called
directly (:mod:`.opus`) on Ogg pages of our own (:mod:`.ogg`), every other format with
PyAV. The encoder is sans-I/O: ``encode()`` returns the bytes that became final,
``flush()`` the rest, and the concatenation of everything it returned is one valid file.
Muxers write into a sink that cannot seek, so no byte already handed out is ever rewritten.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field
from fractions import Fraction

import av
import lameenc
from av.codec.codec import Capabilities
from av.container import OutputContainer

from voxrelay.service.errors import InvalidRequest
from voxrelay.service.model import AudioFormat
from voxrelay.service.ogg import OggWriter
from voxrelay.service.opus import OpusEncoder

__all__ = ["FormatInfo", "StreamEncoder", "format_info", "output_rate"]


@dataclass(frozen=True, slots=True)
class FormatInfo:
    """What a client is told about a format: its MIME type and its default rate.

    ``default_rate`` is ``None`` when the format keeps the engine's rate.
    """

    content_type: str
    default_rate: int | None


@dataclass(frozen=True, slots=True)
class _Encoding:
    """How one format is made; ``muxer`` is ``None`` for raw PCM.

    ``codec`` is ffmpeg's encoder name, which PyAV opens, or :data:`_LAME`; ``muxer`` is
    ffmpeg's muxer name, or :data:`_OGG_PAGES` (libopus called directly; ``codec_options``
    are its settings under ffmpeg's names).
    """

    info: FormatInfo
    muxer: str | None
    codec: str
    sample_format: str
    # Rates: either an explicit set or an inclusive range.
    rates: tuple[int, ...] = ()
    min_rate: int = 8000
    max_rate: int = 48000
    bit_rate: int = 0
    muxer_options: dict[str, str] = field(default_factory=dict)
    #: the encoder's private options (ffmpeg's names for this codec).
    codec_options: dict[str, str] = field(default_factory=dict)
    #: The codec is fed the engine's rate (or the next it takes) whatever rate the stream
    #: reports: Opus decodes at 48 kHz whatever it was fed, and upsampling before the
    #: codec would add nothing but work.
    codec_takes_input_rate: bool = False


#: mp3 frames straight from LAME through lameenc, not PyAV's libmp3lame: the LAME that
#: PyAV's wheels bundle takes three times the CPU for the same frames (docs/performance.md).
_LAME = "lameenc"

#: Packets straight from libopus (:mod:`.opus`, not PyAV's codec context, which costs
#: more per 20 ms frame than libopus's own work) onto Ogg pages written here (:mod:`.ogg`),
#: each ``encode()``'s on one page, not through ffmpeg's Ogg muxer: that holds each packet
#: until the next one comes, and puts every 20 ms packet on a page of its own with a mux
#: call and a write back into Python each (docs/performance.md).
_OGG_PAGES = "ogg pages"

_MPEG_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_AAC_RATES = (*_MPEG_RATES, 64000, 88200, 96000)
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
# Opus always decodes at 48 kHz, so that is the rate an Opus stream reports.
_OPUS_RATE = 48000
#: RFC 7845 5.1: the identification header (version 1, mono, pre-skip, the rate the encoder
#: was fed, no gain, channel mapping family 0).
_OPUS_HEAD = struct.Struct("<8sBBHIhB")
#: RFC 7845 5.2: the comment header, naming its vendor and no comments.
_OPUS_TAGS = b"OpusTags" + struct.pack("<I", 8) + b"voxrelay" + struct.pack("<I", 0)

_ENCODINGS: dict[AudioFormat, _Encoding] = {
    AudioFormat.PCM: _Encoding(FormatInfo("audio/pcm", None), None, "pcm_s16le", "s16"),
    # Unseekable, the wav muxer leaves the RIFF and data sizes at 0xFFFFFFFF, which
    # readers take as "until the end of the file".
    AudioFormat.WAV: _Encoding(FormatInfo("audio/wav", None), "wav", "pcm_s16le", "s16"),
    AudioFormat.MP3: _Encoding(
        FormatInfo("audio/mpeg", None),
        "mp3",
        _LAME,
        "s16",
        rates=_MPEG_RATES,
        bit_rate=64000,
        # LAME quality 7 for speech: less CPU than its default (3) at the same bitrate and
        # spectral distance (docs/performance.md). lameenc writes no Xing/LAME frame
        # (filled in by seeking back at the end, which a stream cannot do) and no ID3 tag.
        codec_options={"quality": "7"},
    ),
    AudioFormat.OPUS: _Encoding(
        FormatInfo("audio/ogg; codecs=opus", _OPUS_RATE),
        _OGG_PAGES,
        "libopus",
        "s16",
        rates=_OPUS_RATES,
        # CELT alone (lowdelay) at complexity 3: a quarter of the CPU of the default
        # (audio, 10), whose SILK and mode analysis cost the most, at about the same
        # spectral distance; 24 kbit/s is a VBR target (docs/performance.md).
        bit_rate=24000,
        codec_options={"application": "lowdelay", "compression_level": "3"},
        codec_takes_input_rate=True,
    ),
    AudioFormat.FLAC: _Encoding(
        FormatInfo("audio/flac", None), "flac", "flac", "s16", max_rate=96000
    ),
    AudioFormat.AAC: _Encoding(
        FormatInfo("audio/aac", None), "adts", "aac", "fltp", rates=_AAC_RATES, bit_rate=64000
    ),
    AudioFormat.MULAW: _Encoding(FormatInfo("audio/basic", 8000), "mulaw", "pcm_mulaw", "s16"),
    AudioFormat.ALAW: _Encoding(FormatInfo("audio/x-alaw-basic", 8000), "alaw", "pcm_alaw", "s16"),
}


def format_info(fmt: AudioFormat) -> FormatInfo:
    """Return the content type and default rate of ``fmt``."""
    return _ENCODINGS[fmt].info


def _supports(encoding: _Encoding, rate: int) -> bool:
    if encoding.rates:
        return rate in encoding.rates
    return encoding.min_rate <= rate <= encoding.max_rate


def _nearest(encoding: _Encoding, rate: int) -> int:
    if encoding.rates:
        return min(encoding.rates, key=lambda r: (abs(r - rate), -r))
    return min(max(rate, encoding.min_rate), encoding.max_rate)


def _nearest_above(encoding: _Encoding, rate: int, ceiling: int) -> int:
    """The lowest rate *encoding* takes at or above *rate*, but at most *ceiling*."""
    return min((r for r in encoding.rates if rate <= r <= ceiling), default=ceiling)


def output_rate(fmt: AudioFormat, input_rate: int, requested: int) -> int:
    """Return the sample rate a stream of ``fmt`` is encoded at.

    ``requested`` 0 means the format's default, else the engine's ``input_rate`` (or
    the nearest rate the format supports). Raise :class:`InvalidRequest` when the
    format cannot carry the requested rate.
    """
    encoding = _ENCODINGS[fmt]
    if requested == 0:
        default = encoding.info.default_rate
        return default if default is not None else _nearest(encoding, input_rate)
    if not _supports(encoding, requested):
        if encoding.rates:
            allowed = ", ".join(str(r) for r in encoding.rates)
        else:
            allowed = f"{encoding.min_rate} to {encoding.max_rate}"
        raise InvalidRequest(
            f"sample_rate_hz {requested} is not supported for {fmt}; use 0 or {allowed}"
        )
    return _OPUS_RATE if fmt is AudioFormat.OPUS else requested


def _pcm_frame(pcm: bytes, rate: int) -> av.AudioFrame:
    """A frame holding *pcm* (s16le mono, whole samples) at *rate*."""
    frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
    frame.planes[0].update(pcm)
    frame.sample_rate = rate
    return frame


def _frame_pcm(frame: av.AudioFrame) -> bytes:
    """The s16 mono samples of *frame* (its plane may be padded past them)."""
    return bytes(frame.planes[0])[: frame.samples * 2]


class _Sink:
    """Collect what the muxer writes.

    Without ``seek``/``tell`` PyAV marks the I/O unseekable, so muxers stream: they
    never go back to patch a header, and every byte written is final.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        """Keep ``data``; PyAV calls this from the muxer."""
        self._chunks.append(data)
        return len(data)

    def take(self) -> bytes:
        """Return and forget everything written so far."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class StreamEncoder:
    """Encode one stream's PCM incrementally into one format.

    Feed s16le mono PCM at ``input_rate`` to :meth:`encode` in chunks of any size; each
    call returns the bytes that became final (maybe ``b""``). :meth:`flush` ends the
    stream; :meth:`close` abandons it. Nothing is written before the first samples
    arrive, and a stream that never had any flushes to ``b""``.

    Not thread-safe: call from one thread at a time (the caller may run it in a worker
    thread). Never run :meth:`close` or :meth:`flush` while an :meth:`encode` is still
    running in another thread — PyAV and libopus crash when a codec is freed under a
    running encode — so the caller joins its worker first. After a call
    raised, the stream is lost: :meth:`close` the encoder.
    """

    def __init__(self, fmt: AudioFormat, *, input_rate: int, output_rate: int) -> None:
        if input_rate <= 0 or output_rate <= 0:
            raise ValueError(f"sample rates must be positive: {input_rate}, {output_rate}")
        self._encoding = _ENCODINGS[fmt]
        self.format = fmt
        self.content_type = self._encoding.info.content_type
        self.sample_rate = output_rate
        self._codec_rate = output_rate
        if self._encoding.codec_takes_input_rate:
            self._codec_rate = _nearest_above(self._encoding, input_rate, output_rate)
        self.channels = 1
        self._input_rate = input_rate
        self._time_base = Fraction(1, self._codec_rate)
        self._odd = b""  # half a sample, kept for the next call
        self._sink = _Sink()
        self._resampler: av.AudioResampler | None = None
        self._lame: lameenc.Encoder | None = None
        self._opus: OpusEncoder | None = None
        self._ogg = OggWriter()
        self._scale = 1  # 48 kHz over the codec's rate
        self._fed = 0  # samples at the codec's rate given to the Opus stream
        self._coded = 0  # ... and encoded into its packets (whole frames)
        self._pending = b""  # PCM short of a whole frame, for the next call
        self._head = b""  # the Ogg Opus headers, until they go out with the first audio
        self._container: OutputContainer | None = None
        self._stream: av.AudioStream | None = None
        self._pts = 0  # in samples at the codec's rate
        self._closed = False

    def encode(self, pcm: bytes) -> bytes:
        """Encode ``pcm`` (s16le mono) and return the bytes that are now final."""
        if self._closed:
            raise RuntimeError("the encoder is closed")
        if self._odd:
            pcm = self._odd + pcm
        whole = len(pcm) & ~1
        self._odd = pcm[whole:]
        if whole == 0:
            return b""
        if whole != len(pcm):
            pcm = pcm[:whole]
        if self._encoding.codec == _LAME:
            lame = self._lame or self._start_lame()
            return bytes(lame.encode(pcm))
        if self._encoding.muxer is None and self._input_rate == self._codec_rate:
            return bytes(pcm)
        if self._encoding.muxer == _OGG_PAGES:
            return self._opus_pages(pcm)
        resampler = self._resampler or self._start()
        self._push(resampler.resample(_pcm_frame(pcm, self._input_rate)))
        return self._sink.take()

    def flush(self) -> bytes:
        """End the stream: drain the resampler, codec and muxer, then close."""
        if self._closed:
            return b""
        try:
            if self._lame is not None:
                return bytes(self._lame.flush())
            if self._opus is not None:
                return self._opus_pages(None)
            if self._resampler is not None:
                self._push(self._resampler.resample(None))
            if self._container is not None and self._stream is not None:
                self._container.mux(self._stream.encode(None))
                self._container.close()  # writes the trailer
                self._container = None
            return self._sink.take()
        finally:
            self.close()

    def close(self) -> None:
        """Release the codec and muxer without flushing; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        container, self._container = self._container, None
        self._stream = None
        self._resampler = None
        self._lame = None
        opus, self._opus = self._opus, None
        if opus is not None:
            opus.close()
        if container is not None:
            # PyAV frees the muxer only by closing it, which writes a trailer that
            # nobody reads on this path; its failing is no reason to fail a cancel.
            with contextlib.suppress(av.FFmpegError):
                container.close()
        self._sink.take()

    def _start_lame(self) -> lameenc.Encoder:
        """Set up LAME, which resamples to the output rate itself."""
        lame = lameenc.Encoder()
        lame.set_channels(self.channels)
        lame.set_in_sample_rate(self._input_rate)
        lame.set_out_sample_rate(self.sample_rate)
        lame.set_bit_rate(self._encoding.bit_rate // 1000)
        lame.set_quality(int(self._encoding.codec_options["quality"]))
        self._lame = lame
        return lame

    def _start_opus(self) -> OpusEncoder:
        """Open libopus at the codec's rate (and a resampler to it when the engine's rate
        is not one Opus takes); the two header pages go out with the call's bytes."""
        encoding = self._encoding
        opus = OpusEncoder(self._codec_rate, encoding.bit_rate, encoding.codec_options)
        if self._input_rate != self._codec_rate:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self._codec_rate)
        # RFC 7845: the identification header (its pre-skip, the encoder's look-ahead, counted
        # at 48 kHz) and the comment header, each on a page of its own, before any audio page.
        self._scale = _OPUS_RATE // self._codec_rate
        head = _OPUS_HEAD.pack(
            b"OpusHead", 1, 1, opus.lookahead * self._scale, self._codec_rate, 0, 0
        )
        self._head = self._ogg.pages([(head, 0)]) + self._ogg.pages([(_OPUS_TAGS, 0)])
        self._opus = opus
        return opus

    def _opus_pages(self, pcm: bytes | None) -> bytes:
        """Encode *pcm* (None: the end) and return the packets made, on one page.

        Packets are whole 20 ms frames; what is left of a frame waits for the next call. At
        the end the last frames are padded with silence until the packets cover the audio
        and the encoder's look-ahead, and the end page's granule position tells a decoder
        where the audio ends, to the sample.
        """
        opus = self._opus or self._start_opus()
        end = pcm is None
        if self._resampler is not None:
            pcm = self._resampled(pcm)
        elif pcm is None:
            pcm = b""
        self._fed += len(pcm) // 2
        pending = self._pending + pcm if self._pending else pcm
        if end:
            cover = self._fed + opus.lookahead - self._coded
            frames = -(-cover // opus.frame_samples)
            pending += bytes(frames * opus.frame_bytes - len(pending))
        step = opus.frame_bytes
        whole = len(pending) - len(pending) % step
        packets = []
        granule = self._coded * self._scale
        for start in range(0, whole, step):
            granule += opus.frame_samples * self._scale
            packets.append((opus.encode(pending[start : start + step]), granule))
        self._coded += whole // 2
        self._pending = pending[whole:]
        head, self._head = self._head, b""
        if end:
            if packets:
                packets[-1] = (packets[-1][0], (opus.lookahead + self._fed) * self._scale)
        elif not packets:
            return head
        return head + self._ogg.pages(packets, last=end)

    def _resampled(self, pcm: bytes | None) -> bytes:
        """*pcm* at the codec's rate (None: what the resampler still holds)."""
        assert self._resampler is not None
        frame = None if pcm is None else _pcm_frame(pcm, self._input_rate)
        return b"".join(_frame_pcm(out) for out in self._resampler.resample(frame))

    def _start(self) -> av.AudioResampler:
        """Open the muxer and codec (unless raw PCM) and the resampler feeding them."""
        encoding = self._encoding
        frame_size = 0
        if encoding.muxer is not None:
            container = av.open(
                self._sink,
                mode="w",
                format=encoding.muxer,
                # Hand each packet to the sink as it is muxed, not when the 32 KiB I/O
                # buffer fills (ffmpeg's default for unseekable output; don't rely on it).
                container_options={"flush_packets": "1", **encoding.muxer_options},
            )
            stream = container.add_stream(
                encoding.codec, rate=self._codec_rate, options=encoding.codec_options
            )
            if not isinstance(stream, av.AudioStream):
                raise TypeError(f"{encoding.codec} is not an audio codec")
            stream.layout = "mono"
            stream.format = encoding.sample_format
            stream.time_base = self._time_base
            if encoding.bit_rate:
                stream.bit_rate = encoding.bit_rate
            codec = stream.codec_context
            codec.open()
            # mp3, aac, opus and flac take frames of exactly frame_size samples; all of
            # them accept a short last frame and pad it themselves.
            if not codec.codec.capabilities & Capabilities.variable_frame_size:
                frame_size = codec.frame_size
            self._container, self._stream = container, stream
        self._resampler = av.AudioResampler(
            format=encoding.sample_format,
            layout="mono",
            rate=self._codec_rate,
            frame_size=frame_size or None,
        )
        return self._resampler

    def _push(self, frames: list[av.AudioFrame]) -> None:
        """Encode and mux resampled frames, or for raw PCM keep their bytes."""
        for frame in frames:
            if self._container is None or self._stream is None:
                self._sink.write(_frame_pcm(frame))
                continue
            frame.pts = self._pts
            frame.time_base = self._time_base
            self._pts += frame.samples
            self._container.mux(self._stream.encode(frame))
