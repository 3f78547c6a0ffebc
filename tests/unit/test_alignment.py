"""The transcript aligner: a speaking model's transcript and audio, paired segment by segment."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from fakes.openai_upstream import tokenize
from voxrelay.service.alignment import TranscriptAligner
from voxrelay.service.chunker import SentenceChunker

REPLY = (
    "Sure, here is what I found. A single ticket costs $3.50 for adults. "
    "Children under five ride for free! Have a pleasant trip."
)


def audio_of(token: str) -> bytes:
    """Stand-in PCM: two bytes per character, tagged with the token so tests can trace it."""
    return token.encode().ljust(2 * len(token), b"_")[: 2 * len(token)]


def split(items: list[str | bytes]) -> list[tuple[str, bytes]]:
    """Group emitted items into (segment text, its audio)."""
    groups: list[tuple[str, bytes]] = []
    for item in items:
        if isinstance(item, str):
            groups.append((item, b""))
        else:
            assert groups, "audio came before its segment"
            text, audio = groups[-1]
            groups[-1] = (text, audio + item)
    return groups


def speak(tokens: list[str], *, lead: int = 0) -> list[str | bytes]:
    """Feed each token's transcript *lead* tokens ahead of its audio, like a speaking model."""
    aligner = TranscriptAligner()
    out: list[str | bytes] = []
    for i in range(len(tokens) + lead):
        if i < len(tokens):
            out += aligner.transcript(tokens[i])
        if i - lead >= 0:
            out += aligner.audio(audio_of(tokens[i - lead]))
    return out + aligner.end()


def sentences(text: str) -> list[str]:
    chunker = SentenceChunker()
    return chunker.feed(text) + chunker.flush()


def owners(groups: list[tuple[str, bytes]], tokens: list[str]) -> list[bytes]:
    """The audio each segment should get: that of the tokens whose last character it holds."""
    ends = []
    position = 0
    for text, _ in groups:
        position = REPLY.index(text, position) + len(text)
        ends.append(position)
    expected = [b""] * len(groups)
    position = 0
    for token in tokens:
        position += len(token)
        expected[next(i for i, end in enumerate(ends) if position <= end)] += audio_of(token)
    return expected


def test_waiting_audio_makes_the_first_complete_words_the_first_segment() -> None:
    tokens = tokenize(REPLY)
    groups = split(speak(tokens))
    # "Sure," is complete once " here" arrives, and its audio is waiting by then.
    assert groups[0][0] == "Sure,"
    assert [text for text, _ in groups[1:]] == sentences(REPLY.removeprefix("Sure,"))
    assert [audio for _, audio in groups] == owners(groups, tokens)


def test_audio_streams_as_soon_as_its_segment_is_announced() -> None:
    aligner = TranscriptAligner()
    assert aligner.audio(b"zz") == []  # held: no segment is announced
    assert aligner.transcript("Sure, here it is. Hello there, my friend.") == [
        "Sure, here it is.",
        b"zz",
    ]
    assert aligner.audio(b"ab") == [b"ab"]  # the announced segment's: it goes at once
    # The second sentence is certain once " How" comes; its audio (none yet) follows it.
    assert aligner.transcript(" How") == ["Hello there, my friend."]
    assert aligner.audio(b"cd") == []  # " How" came before b"cd": it is the next segment's
    assert aligner.end() == ["How", b"cd"]


def test_the_first_segment_is_cut_early_only_when_audio_waits() -> None:
    aligner = TranscriptAligner()
    assert aligner.transcript("Hello there, my fri") == []  # no audio waits: no cut
    assert aligner.audio(b"ab") == ["Hello there, my", b"ab"]  # "fri" is not a whole word
    assert aligner.transcript("end. How") == []
    assert aligner.audio(b"cd") == []  # after "end. How" came: the next segment's audio
    assert aligner.end() == ["friend. How", b"cd"]  # too short alone: joined


def test_a_script_without_spaces_waits_for_its_sentence_end() -> None:
    aligner = TranscriptAligner()
    assert aligner.transcript("今日は") == []
    assert aligner.audio(b"ab") == []
    assert aligner.transcript("晴れです。明日") == ["今日は晴れです。", b"ab"]


def test_audio_before_any_transcript_waits_for_the_first_segment() -> None:
    aligner = TranscriptAligner()
    out = aligner.audio(b"\x01\x02" * 10)
    out += aligner.transcript("Hi.")
    out += aligner.audio(b"\x03\x04")
    out += aligner.end()
    assert out[0] == "Hi."
    assert b"".join(x for x in out if isinstance(x, bytes)) == b"\x01\x02" * 10 + b"\x03\x04"


def test_audio_without_a_transcript_is_announced_with_no_text() -> None:
    aligner = TranscriptAligner()
    assert aligner.audio(b"xy") == []
    assert aligner.end() == ["", b"xy"]
    assert aligner.segments == 1


def test_nothing_at_all_emits_nothing() -> None:
    assert TranscriptAligner().end() == []


def test_a_transcript_far_ahead_of_the_audio_keeps_every_byte_in_order() -> None:
    tokens = tokenize(REPLY)
    out = speak(tokens, lead=len(tokens))
    groups = split(out)
    assert b"".join(a for _, a in groups) == b"".join(audio_of(t) for t in tokens)
    assert len(groups) == 4


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=len(REPLY) - 1), max_size=30),
    audio_sizes=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=40),
    order=st.lists(st.booleans(), min_size=70, max_size=70),
)
def test_any_interleaving_keeps_the_words_and_every_byte(
    cuts: list[int], audio_sizes: list[int], order: list[bool]
) -> None:
    bounds = sorted({0, *cuts, len(REPLY)})
    deltas = [REPLY[a:b] for a, b in itertools.pairwise(bounds)]
    audio = [bytes([i % 251]) * n for i, n in enumerate(audio_sizes)]
    aligner = TranscriptAligner()
    out: list[str | bytes] = []
    d = a = 0
    for take_text in order:
        if take_text and d < len(deltas):
            out += aligner.transcript(deltas[d])
            d += 1
        elif a < len(audio):
            out += aligner.audio(audio[a])
            a += 1
    for delta in deltas[d:]:
        out += aligner.transcript(delta)
    for pcm in audio[a:]:
        out += aligner.audio(pcm)
    out += aligner.end()

    texts = [x for x in out if isinstance(x, str)]
    assert all(texts) and aligner.segments == len(texts)
    # The first segment may be cut short; the rest are the chunker's from there on.
    assert REPLY.startswith(texts[0])
    assert texts[1:] == sentences(REPLY.removeprefix(texts[0]))
    assert isinstance(out[0], str)  # no audio before the first segment
    assert b"".join(x for x in out if isinstance(x, bytes)) == b"".join(audio)
