"""The benchmark's listener finds when the first sound plays, stalls included."""

from __future__ import annotations

from bench.clients import PCM_BYTES_PER_S, Listener, OggClock, Playback
from fakes.openai_upstream import voice_pcm
from voxrelay.service.audio import StreamEncoder
from voxrelay.service.model import AudioFormat

MS = PCM_BYTES_PER_S // 1000


def test_the_first_sound_plays_after_the_silence_in_front_of_it() -> None:
    pcm = bytes(150 * MS) + voice_pcm(24_000 // 10)
    playback = Playback()
    for at, offset in enumerate(range(0, len(pcm), 7 * MS + 1)):
        chunk = pcm[offset : offset + 7 * MS + 1]
        playback.arrive(10.0 + at * 0.001, len(chunk))  # faster than it plays
        playback.listen(chunk)
    assert playback.audible is not None
    assert abs(playback.audible - 10.150) < 0.0105


def test_a_stall_before_the_first_sound_delays_it() -> None:
    playback = Playback()
    playback.arrive(1.0, 50 * MS)
    playback.listen(bytes(50 * MS))
    assert playback.audible is None
    # The next chunk comes 200 ms late: the silence played out 150 ms before it came.
    playback.arrive(1.2, 100 * MS)
    playback.listen(voice_pcm(2400))
    assert playback.audible is not None
    assert abs(playback.audible - 1.2) < 1e-9


def test_the_ogg_clock_reads_an_opus_stream_duration_from_its_pages() -> None:
    encoder = StreamEncoder(AudioFormat.OPUS, input_rate=24_000, output_rate=48_000)
    stream = encoder.encode(voice_pcm(24_000)) + encoder.flush()  # one second
    clock = OggClock()
    heard = [clock.feed(stream[i : i + 37]) for i in range(0, len(stream), 37)]
    assert heard == sorted(heard)  # only whole pages count, in order
    assert heard[0] == 0.0  # the header pages carry no audio
    assert 1.0 <= heard[-1] <= 1.03  # the end, with the encoder's pre-skip
    listener = Listener("opus")
    assert not listener.arrive(0.0, stream[:47])  # OpusHead alone is no audio yet
    assert listener.arrive(0.001, stream[47:])
