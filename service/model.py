"""The core's vocabulary: what a caller asks for and the events it gets back.

These are plain dataclasses; each door translates them to and from its wire format.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .text_input import TextInput

__all__ = [
    "AudioChunk",
    "AudioFormat",
    "ChatMessage",
    "Event",
    "Mode",
    "SegmentStarted",
    "StreamFinished",
    "StreamStarted",
    "SynthesisRequest",
    "Voice",
    "WordTiming",
    "WordTimings",
]


class Mode(enum.StrEnum):
    """Whether the text is answered by the LLM (chat) or spoken as written (speak)."""

    CHAT = "chat"
    SPEAK = "speak"


class AudioFormat(enum.StrEnum):
    """The audio encodings a stream can be delivered in."""

    PCM = "pcm"
    WAV = "wav"
    MP3 = "mp3"
    OPUS = "opus"
    FLAC = "flac"
    AAC = "aac"
    MULAW = "mulaw"
    ALAW = "alaw"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Voice:
    """One voice of a speech engine."""

    name: str
    language: str


@dataclass(frozen=True, slots=True)
class SynthesisRequest:
    """One request for a spoken stream, already decoded from the wire.

    Empty strings and zeros mean "the default", as on the wire; the pipeline
    validates and resolves them.
    """

    text: str
    mode: Mode = Mode.CHAT
    voice: str = ""
    format: AudioFormat | None = None
    sample_rate_hz: int = 0
    instructions: str = ""
    history: Sequence[ChatMessage] = ()
    speed: float = 0.0
    request_id: str = ""
    #: send each segment's words with their times after its audio.
    word_timestamps: bool = False
    #: make the text speakable first; None is the server's default.
    normalization: bool | None = None
    #: streamed input (speak mode): the text comes from here, after ``text`` if any.
    input: TextInput | None = None


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """The first event: the stream's audio parameters and who makes it."""

    request_id: str
    format: AudioFormat
    content_type: str
    sample_rate_hz: int
    channels: int
    voice: str
    llm_model: str
    tts_model: str


@dataclass(frozen=True, slots=True)
class SegmentStarted:
    """The text of the audio that follows; ``start_ms`` is where that audio begins."""

    index: int
    text: str
    start_ms: int
    #: what the engine was given, when normalization changed it; else empty.
    spoken: str = ""
    #: where ``text`` starts in the reply (chat) or the caller's text (speak).
    text_offset: int = 0


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Encoded audio bytes; ``seq`` counts up by one across the whole stream."""

    segment_index: int
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WordTiming:
    """One word of a segment's text: where it is heard and where it stands in the text.

    Times are on the stream's audio clock (as ``SegmentStarted.start_ms``); ``text_offset``
    counts code points into the reply (chat) or the caller's text (speak).
    """

    text: str
    start_ms: int
    end_ms: int
    text_offset: int


@dataclass(frozen=True, slots=True)
class WordTimings:
    """The words of one segment, after its audio; ``estimated`` unless the engine said."""

    segment_index: int
    words: tuple[WordTiming, ...]
    estimated: bool


@dataclass(slots=True)
class StreamFinished:
    """The last event, with the stream's figures (times in milliseconds)."""

    reply_text: str = ""
    segments: int = 0
    audio_bytes: int = 0
    audio_ms: int = 0
    time_to_first_audio_ms: int = 0
    total_ms: int = 0
    llm_first_token_ms: int = 0
    tts_first_byte_ms: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


Event = StreamStarted | SegmentStarted | AudioChunk | WordTimings | StreamFinished
