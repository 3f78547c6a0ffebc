"""Pair a speaking model's transcript with its audio, segment by segment, without I/O.

A speaking model (OpenAI's Realtime API) streams two things at once: transcript deltas
and the PCM of the same words, with no timestamps tying one to the other. voxrelay's
event stream wants ``segment(i)`` — a whole sentence — before the audio of that sentence.
:class:`TranscriptAligner` cuts the transcript with the same :class:`SentenceChunker` as
the chat path and decides which audio belongs to which segment::

    aligner = TranscriptAligner()
    for item in aligner.transcript(delta):   # or aligner.audio(pcm), aligner.end()
        if isinstance(item, str): ...        # the next segment's text
        else: ...                            # PCM of the current segment

The rule: a transcript delta's words are spoken by the audio that arrives after it and
before the next delta (the model writes the words a little ahead of speaking them). So a
segment's audio runs from where its first delta arrived to where the first delta after
its last character arrived. Audio that comes before its segment is complete is held
back, so no audio precedes its segment; audio of a segment already announced flows at
once. Nothing is dropped: audio left at the end belongs to the last segment.

The first segment is the exception that keeps the first audio fast: when audio is
waiting and no sentence is complete yet, the words complete so far become the first
segment (a caption cut short costs a speaking model nothing, unlike a TTS engine, whose
intonation needs the whole clause). From there on the chunker cuts as usual.
"""

from __future__ import annotations

import re
from collections import deque

from .chunker import SentenceChunker

__all__ = ["TranscriptAligner"]

#: The longest start of a text that ends a word: its last non-space before a space.
_COMPLETE_WORDS = re.compile(r"\s*(.*\S)\s", re.DOTALL)


class TranscriptAligner:
    """Interleave transcript segments (``str``) and their PCM (``bytes``) in speaking order."""

    def __init__(self) -> None:
        self._chunker = SentenceChunker()
        # The transcript not yet matched to segments, from character offset ``_base``.
        self._text = ""
        self._base = 0
        self._chars = 0
        # (character offset where a delta starts, audio bytes received when it came).
        self._marks: deque[tuple[int, int]] = deque()
        # Segments the chunker released and not yet announced: (text, end offset).
        self._pending: deque[tuple[str, int]] = deque()
        # The segment announced last: its end offset, or None once its audio is complete.
        self._current_end: int | None = None
        self._announced = 0
        self._received = 0
        self._released = 0
        self._held = bytearray()
        self._ended = False

    @property
    def segments(self) -> int:
        """Return how many segments have been announced."""
        return self._announced

    def transcript(self, delta: str) -> list[str | bytes]:
        """Take the next transcript delta; return what can be emitted now."""
        if not delta:
            return []
        self._marks.append((self._chars, self._received))
        self._text += delta
        self._chars += len(delta)
        for segment in self._chunker.feed(delta):
            self._queue(segment)
        return self._release()

    def audio(self, pcm: bytes) -> list[str | bytes]:
        """Take the next PCM; return what can be emitted now."""
        if not pcm:
            return []
        self._received += len(pcm)
        self._held += pcm
        return self._release()

    def end(self) -> list[str | bytes]:
        """End the response: return the remaining segments and all the audio still held."""
        for segment in self._chunker.flush():
            self._queue(segment)
        self._ended = True
        out = self._release()
        if self._held:
            if not self._announced:
                # Audio without a transcript: announce it with no text rather than lose it.
                self._announced += 1
                out.append("")
            out.append(bytes(self._held))
            self._released += len(self._held)
            self._held.clear()
        return out

    def _queue(self, segment: str) -> None:
        # Segments are stripped slices of the transcript, in order: find where it ends.
        found = self._text.find(segment)
        start = self._base + (found if found >= 0 else 0)
        end = start + len(segment)
        self._pending.append((segment, end))
        cut = end - self._base
        self._text = self._text[cut:]
        self._base = end

    def _cut_first_words(self) -> None:
        """Make the words complete so far the first segment; restart the chunker after them."""
        match = _COMPLETE_WORDS.match(self._text)
        if match is None:
            return  # no word is complete yet (or the script has no spaces)
        self._queue(match.group(1))
        self._chunker = SentenceChunker()
        for segment in self._chunker.feed(self._text):
            self._queue(segment)

    def _boundary(self, end: int) -> int | None:
        """Return the audio offset where the segment ending at *end* stops, if known yet."""
        marks = self._marks
        while marks and marks[0][0] < end:
            marks.popleft()
        return marks[0][1] if marks else None

    def _release(self) -> list[str | bytes]:
        out: list[str | bytes] = []
        while True:
            if self._current_end is None:
                if not self._pending and self._held and not self._announced:
                    self._cut_first_words()
                if not self._pending:
                    return out
                text, self._current_end = self._pending.popleft()
                self._announced += 1
                out.append(text)
            last = self._ended and not self._pending
            boundary = None if last else self._boundary(self._current_end)
            take = len(self._held)
            if boundary is not None:
                take = max(0, min(take, boundary - self._released))
            if take:
                out.append(bytes(self._held[:take]))
                del self._held[:take]
                self._released += take
            if boundary is None:
                if not self._ended or last:
                    return out  # the segment goes on with audio still to come
                # The response is over and no later delta says where this segment stops:
                # what was held is its audio, and the next segments get what is left.
            elif self._released < boundary:
                return out
            self._current_end = None
