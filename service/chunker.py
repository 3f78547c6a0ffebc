"""Cut a streamed reply into segments a speech engine can say one after another.

An LLM reply arrives as text deltas of any size; :class:`SentenceChunker` turns them
into whole sentences (clauses, when a sentence runs long) as soon as each one is
certain, so speech starts long before the reply is complete.

It works in two layers, and both depend on the text alone, never on how it was split
into deltas — so feeding a reply whole or one character at a time gives the same
segments:

* a scanner reads each character once and records *cut points* (sentence ends,
  paragraph breaks, clause punctuation, spaces), each only once it is final: a "."
  waits for the next non-space character, because "$3." may become "$3.50" and
  "e.g." is followed by a lowercase word;
* a segmenter picks the end of the next segment among the recorded cut points, and
  only once every cut point that could change its choice has been recorded.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass

__all__ = ["SentenceChunker"]


class _Kind(enum.IntEnum):
    """How good a place to cut is, weakest first."""

    SPACE = 0
    CLAUSE = 1
    SENTENCE = 2
    PARAGRAPH = 3  # a blank line, or the end of the text: always cut here


# Stops that end a sentence only before whitespace and a new sentence ("3.14", "e.g. so").
_WEAK_STOPS = frozenset(".!?…‼⁇⁈⁉")
# Stops that end a sentence wherever they stand: CJK, Devanagari, Arabic, Urdu,
# Armenian, Ethiopic, the Greek question mark.
_STRONG_STOPS = frozenset("。！？｡।॥؟۔։።፧\u037e")
# What may follow a stop and still belong to its sentence: `He said "Stop."`, `(See above.)`.
_CLOSERS = frozenset("\"'”’»›)]}」』）］｝】〕〗》〉*_")
# Clause punctuation: a cut point only before whitespace ("3,000", "10:30", "a—b" stay whole).
_CLAUSES = frozenset(",;:—–،؛")
# Full-width clause punctuation, a cut point wherever it stands.
_STRONG_CLAUSES = frozenset("，、；：")

# Words a "." follows without ending the sentence, whatever comes next.
_TITLES = frozenset(
    {"mr", "mrs", "ms", "mx", "dr", "prof", "st", "mt", "vs", "cf", "viz"}
    | {"capt", "col", "gen", "gov", "lt", "rep", "rev", "sen", "sgt", "hon"}
)
# Words a "." follows without ending the sentence when a number comes next ("No. 5").
_BEFORE_NUMBERS = frozenset({"no", "nos", "fig", "figs", "vol", "pp", "ch", "eq", "sec", "art"})
# Times end sentences as often as they sit inside one, so they get no exception.
_TIMES = frozenset(("a.m", "p.m"))
# Characters of a word, as far as abbreviations go: "U.S", "Mary's", "well-known".
_WORD_PUNCTUATION = frozenset(".'’-")
# A longer word is never an abbreviation, so the scanner remembers no more of it.
_MAX_WORD = 16


@dataclass(frozen=True, slots=True)
class _Cut:
    """A place the text may be cut: before offset ``pos``; the next segment starts at ``resume``."""

    pos: int
    kind: _Kind
    resume: int


@dataclass(slots=True)
class _Mark:
    """A run of stops or clause punctuation whose meaning waits on what follows it."""

    start: int
    kind: _Kind  # SENTENCE for stops, CLAUSE for clause punctuation
    strong: bool  # a cut point even without whitespace after it
    word: str  # the word just before a stop, to recognise abbreviations
    word_at_line_start: bool
    single_dot: bool
    closed: bool = False  # closing quotes or brackets followed: the run cannot grow

    def ends_sentence(self, following: str) -> bool:
        """Return whether the sentence ends here, given the next non-space character."""
        if self.kind is not _Kind.SENTENCE:
            return False
        if self.strong:
            return True
        return not following.islower() and not self._is_abbreviation(following)

    def _is_abbreviation(self, following: str) -> bool:
        word = self.word.lstrip("'’").lower()
        if not self.single_dot or not word or len(word) > _MAX_WORD or word in _TIMES:
            return False
        if word in _TITLES or (word in _BEFORE_NUMBERS and following.isdigit()):
            return True
        parts = word.split(".")
        if (len(parts) > 1 or len(word) == 1) and all(len(p) <= 2 and p.isalpha() for p in parts):
            return True  # an initial or a dotted acronym: "J.", "U.S.", "e.g.", "Ph.D."
        return self.word_at_line_start and word.isdigit() and len(word) <= 3  # "1. First"


class SentenceChunker:
    """Cut streamed text into speakable segments, without I/O.

    Pass each text delta to :meth:`feed`, which returns the segments it completes, and
    call :meth:`flush` at the end of the text for the rest (:meth:`cut` forces a cut
    without ending the text). Segments are stripped,
    never empty, and together hold every word of the text exactly once, in order.

    A segment ends at a sentence end once it has *min_chars* characters (shorter
    sentences are joined with the next one), at a blank line, or at the end of the
    text. A longer run is split at clause punctuation, else at a space, else (a run with
    no space, such as a long number) where it reaches *max_chars*: no segment is longer.
    The first segment only
    needs *first_min_chars*, and when no sentence ends within *first_max_chars* it is
    cut at the last clause punctuation there, so that the first audio comes fast.
    """

    def __init__(
        self,
        *,
        min_chars: int = 20,
        max_chars: int = 300,
        first_min_chars: int = 8,
        first_max_chars: int = 60,
    ) -> None:
        if not (0 < first_min_chars <= first_max_chars <= max_chars and min_chars >= 0):
            raise ValueError(
                "need 0 < first_min_chars <= first_max_chars <= max_chars and min_chars >= 0"
            )
        # Limits
        self._min = min_chars
        self._max = max_chars
        self._first_min = first_min_chars
        self._first_max = first_max_chars
        self._reset()

    def _reset(self) -> None:
        # The text not yet emitted: ``_text`` holds it from offset ``_base``, then
        # ``_parts`` the deltas not yet joined to it.
        self._text = ""
        self._base = 0
        self._parts: list[str] = []
        self._n = 0  # characters scanned
        self._final = False
        # Scanner
        self._mark: _Mark | None = None
        self._space_start: int | None = None
        self._space_after: _Mark | None = None
        self._newlines = 0
        self._word = ""
        self._word_at_line_start = True
        self._line_start = True
        # Segmenter
        self._cuts: list[_Cut] = []
        self._head = 0  # first cut point after the current segment's start
        self._examined = 0  # cut points already ruled out as the segment's sentence end
        self._start = 0  # where the current segment starts
        self._emitted = False
        self._early_tried = False

    def feed(self, delta: str) -> list[str]:
        """Take the next piece of text; return the segments it completes, in order."""
        if not delta:
            return []
        self._parts.append(delta)
        step, i = self._step, self._n
        for ch in delta:
            step(ch, i)
            i += 1
        self._n = i
        return self._drain()

    def flush(self) -> list[str]:
        """End the text: return the segments still held, and get ready for a new text."""
        segments = self.cut()
        self._reset()
        return segments

    def cut(self) -> list[str]:
        """Cut here without ending the text: return the segments still held.

        What follows starts a new segment, even mid-word ("$3." cut, then "50"), and the
        text goes on: offsets, the first segment's rules and abbreviations carry over.
        """
        end = self._n if self._space_start is None else self._space_start
        self._cuts.append(_Cut(end, _Kind.PARAGRAPH, end))
        self._final = True
        try:
            return self._drain()
        finally:
            self._final = False

    # Scanner

    def _step(self, ch: str, i: int) -> None:
        """Read the character at offset *i*."""
        if ch.isspace():
            if self._space_start is None:
                self._space_start, self._newlines = i, 0
                self._space_after, self._mark = self._mark, None
            if ch == "\n":
                self._newlines += 1
        else:
            if self._space_start is not None:
                self._cuts.append(_Cut(self._space_start, self._space_kind(ch), i))
                self._space_start = self._space_after = None
            if not self._extend_mark(ch, i):
                self._start_mark(ch, i)
        # Remember the word being read, for the abbreviation rules.
        if ch.isalnum() or ch in _WORD_PUNCTUATION:
            if not self._word:
                self._word_at_line_start = self._line_start
            if len(self._word) <= _MAX_WORD:
                self._word += ch
        else:
            self._word = ""
        if ch == "\n":
            self._line_start = True
        elif not ch.isspace():
            self._line_start = False

    def _space_kind(self, following: str) -> _Kind:
        """Classify the whitespace run that ends before *following*."""
        kind = _Kind.SPACE
        if self._newlines >= 2:
            kind = _Kind.PARAGRAPH
        elif self._newlines == 1 and not following.islower():
            kind = _Kind.SENTENCE  # a line break before a new sentence, list item or heading
        mark = self._space_after
        if mark is not None and mark.kind is _Kind.CLAUSE:
            kind = max(kind, _Kind.CLAUSE)
        elif mark is not None and mark.ends_sentence(following):
            kind = max(kind, _Kind.SENTENCE)
        return kind

    def _extend_mark(self, ch: str, i: int) -> bool:
        """Add *ch* to the pending mark if it belongs there; else settle the mark."""
        mark = self._mark
        if mark is None:
            return False
        if ch in _CLOSERS:
            mark.closed = True
            return True
        is_stop = ch in _WEAK_STOPS or ch in _STRONG_STOPS
        if is_stop and mark.kind is _Kind.SENTENCE and not mark.closed:
            mark.strong = mark.strong or ch in _STRONG_STOPS  # "?!", "？！", "..."
            mark.single_dot = False
            return True
        self._mark = None
        if mark.strong:
            self._cuts.append(_Cut(i, mark.kind, i))
        return False

    def _start_mark(self, ch: str, i: int) -> None:
        if ch in _WEAK_STOPS or ch in _STRONG_STOPS:
            strong, word, at_line_start = ch in _STRONG_STOPS, self._word, self._word_at_line_start
            self._mark = _Mark(i, _Kind.SENTENCE, strong, word, at_line_start, ch == ".")
        elif ch in _CLAUSES or ch in _STRONG_CLAUSES:
            self._mark = _Mark(i, _Kind.CLAUSE, ch in _STRONG_CLAUSES, "", False, False)

    def _known_before(self) -> int:
        """Return the offset before which every cut point has been recorded."""
        if self._final:
            return sys.maxsize
        if self._space_start is not None:
            return self._space_start
        if self._mark is not None:
            return self._mark.start + 1
        return self._n

    # Segmenter

    def _drain(self) -> list[str]:
        segments = []
        while (cut := self._next_cut()) is not None:
            segments.append(self._take(cut))
        return segments

    def _next_cut(self) -> _Cut | None:
        """Return where the current segment ends, or None while that is not yet certain."""
        cuts = self._cuts
        while self._head < len(cuts) and cuts[self._head].pos <= self._start:
            # Whitespace at the very start or end of the text: nothing to say.
            self._start = max(self._start, cuts[self._head].resume)
            self._head += 1
            self._examined = max(self._examined, self._head)
        start, known = self._start, self._known_before()
        least = self._min if self._emitted else self._first_min
        limit = start + self._max
        found = None
        while self._examined < len(cuts) and cuts[self._examined].pos <= limit:
            cut = cuts[self._examined]
            if cut.kind is _Kind.PARAGRAPH or (
                cut.kind is _Kind.SENTENCE and cut.pos - start >= least
            ):
                found = cut
                break
            self._examined += 1
        first_end = start + self._first_max
        if (
            not self._emitted
            and not self._early_tried
            and known > first_end
            and (found is None or found.pos > first_end)
        ):
            self._early_tried = True
            early = self._latest(start + self._first_min, first_end, _Kind.CLAUSE)
            if early is not None:
                return early
        if found is not None:
            return found
        if known <= limit:
            return None
        # No sentence ends in time: split at a clause, else at a space, else inside the
        # one long run that fills the window (no engine call takes more than max_chars).
        return (
            self._latest(start + least, limit, _Kind.CLAUSE)
            or self._latest(start + 1, limit, _Kind.SPACE)
            or (_Cut(limit, _Kind.SPACE, limit) if self._n > limit else None)
        )

    def _latest(self, low: int, high: int, kind: _Kind) -> _Cut | None:
        """Return the last cut point at least as good as *kind* between *low* and *high*."""
        best = None
        cuts, i = self._cuts, self._head
        while i < len(cuts) and cuts[i].pos <= high:
            if cuts[i].pos >= low and cuts[i].kind >= kind:
                best = cuts[i]
            i += 1
        return best

    def _take(self, cut: _Cut) -> str:
        """Return the current segment, ending at *cut*, and start the next one."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        segment = self._text[self._start - self._base : cut.pos - self._base]
        self._start = cut.resume
        self._emitted = True
        while self._head < len(self._cuts) and self._cuts[self._head].pos <= cut.pos:
            self._head += 1
        # Drop what has been said once it outweighs what is left, so feeding stays linear.
        if 2 * (self._start - self._base) > len(self._text):
            self._text = self._text[self._start - self._base :]
            self._base = self._start
        if 2 * self._head > len(self._cuts):
            del self._cuts[: self._head]
            self._head = 0
        self._examined = self._head
        return segment
