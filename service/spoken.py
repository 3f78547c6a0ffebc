"""Text as an engine is given it, with a map back to the text it was made from.

Normalization rewrites a segment ("**$3.50** 🎉") into what a speech engine should
read ("three dollars fifty"), and word timings must still point into the original.
:class:`Spoken` holds both texts and a monotonic map between them, built from
*pieces*: a run of spoken text that is either a verbatim copy of a run of the
original (mapped character by character) or a replacement of one (every position
inside maps to the replaced run's start). A piece may be empty on either side: an
empty spoken side drops original text (markdown markers, emoji); an empty original
side inserts spoken text (a pause between a heading and what follows).

Each rewriting step, normalization's rules and the lexicon alike, is a list of edits
on the spoken text passed to :meth:`Spoken.rewrite`, which composes the maps, so
steps chain without knowing about each other.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Edit", "Spoken", "SpokenBuilder"]

#: Replace ``text[start:end]`` with ``replacement``; positions are in the spoken text.
Edit = tuple[int, int, str]


@dataclass(frozen=True, slots=True)
class Spoken:
    """A spoken text and where each of its positions comes from in *original*.

    Piece ``k`` covers ``text[starts[k]:starts[k + 1]]`` and
    ``original[origins[k]:origins[k + 1]]``, a verbatim copy if ``copied[k]``; both
    lists end with the texts' lengths, so they hold one entry more than *copied*.
    """

    text: str
    original: str
    starts: tuple[int, ...]
    origins: tuple[int, ...]
    copied: tuple[bool, ...]

    @classmethod
    def verbatim(cls, text: str) -> Spoken:
        """Return *text* spoken as it is."""
        return cls(text, text, (0, len(text)), (0, len(text)), (True,))

    @property
    def changed(self) -> bool:
        """Return whether the engine is given something other than the original."""
        return self.text != self.original

    def _piece_at(self, i: int) -> int:
        """Return the non-empty piece holding spoken position *i* (``0 <= i < len``)."""
        # Empty pieces share their start with the next piece, and bisect_right picks
        # the last of those: the non-empty one.
        return bisect_right(self.starts, i, 0, len(self.copied)) - 1

    def to_original(self, i: int) -> int:
        """Return the original position that spoken position *i* comes from."""
        if i >= len(self.text):
            return len(self.original)
        i = max(i, 0)
        k = self._piece_at(i)
        if self.copied[k]:
            return self.origins[k] + i - self.starts[k]
        return self.origins[k]

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """Return the original span the spoken span ``[start, end)`` was made from.

        A span that touches a replacement covers the whole replaced run: "fifty" in
        "three dollars fifty" comes from all of "$3.50".
        """
        n = len(self.text)
        start, end = max(0, min(start, n)), max(0, min(end, n))
        if end <= start:
            at = self.to_original(start)
            return at, at
        first, last = self._piece_at(start), self._piece_at(end - 1)
        if self.copied[first]:
            lo = self.origins[first] + start - self.starts[first]
        else:
            lo = self.origins[first]
        if self.copied[last]:
            hi = self.origins[last] + end - self.starts[last]
        else:
            hi = self.origins[last + 1]
        return lo, hi

    def rewrite(self, edits: Iterable[Edit]) -> Spoken:
        """Return this text with *edits* applied, its map composed with theirs.

        Edits are ``(start, end, replacement)`` on :attr:`text`, sorted and not
        overlapping. An edit that reaches into a replacement widens to all of it, so
        a map never splits a replaced run.
        """
        text = self.text
        groups: list[tuple[int, int, str]] = []
        # The group being built: its widened span, its parts, the end of its last edit.
        low = high = cursor = -1
        parts: list[str] = []
        for start, end, replacement in edits:
            if start > end or start < max(cursor, 0) or end > len(text):
                raise ValueError(f"bad or overlapping edit ({start}, {end})")
            if start == end and not replacement:
                continue
            wide_start, wide_end = self._widen(start, end)
            if parts and wide_start < high:
                parts += [text[cursor:start], replacement]
                high = max(high, wide_end)
            else:
                if parts:
                    parts.append(text[cursor:high])
                    groups.append((low, high, "".join(parts)))
                low, high = wide_start, wide_end
                parts = [text[wide_start:start], replacement]
            cursor = end
        if not parts:
            return self
        parts.append(text[cursor:high])
        groups.append((low, high, "".join(parts)))
        out = SpokenBuilder(self.original)
        pos = 0
        for start, end, replacement in groups:
            self._copy_range(out, pos, start)
            if end > start:
                lo, hi = self.original_span(start, end)
            else:
                lo = hi = self.to_original(start)
            out.replace(lo, hi, replacement)
            pos = end
        self._copy_range(out, pos, len(text))
        return out.build()

    def _widen(self, start: int, end: int) -> tuple[int, int]:
        """Widen ``[start, end)`` to whole replacements at either side."""
        if start < len(self.text):
            k = self._piece_at(start)
            if not self.copied[k] and start > self.starts[k]:
                start = self.starts[k]
        if 0 < end < len(self.text):
            k = self._piece_at(end)
            if not self.copied[k] and end > self.starts[k]:
                end = self.starts[k + 1]
        return start, end

    def _copy_range(self, out: SpokenBuilder, start: int, end: int) -> None:
        """Carry the spoken range ``[start, end)`` over to *out* with its map.

        The range never splits a replacement (see :meth:`_widen`); dropped runs
        need no call, as the builder drops whatever it skips.
        """
        if end <= start:
            return
        k = self._piece_at(start)
        while k < len(self.copied) and self.starts[k] < end:
            s0, s1 = self.starts[k], self.starts[k + 1]
            if s1 > s0:
                if self.copied[k]:
                    delta = self.origins[k] - s0
                    out.keep(max(start, s0) + delta, min(end, s1) + delta)
                else:
                    out.replace(self.origins[k], self.origins[k + 1], self.text[s0:s1])
            k += 1


class SpokenBuilder:
    """Build a :class:`Spoken` from left to right over *original*.

    Every call covers the original from where the previous one stopped; a gap is
    dropped (the original text there is not spoken).
    """

    def __init__(self, original: str) -> None:
        self._originsal = original
        self._parts: list[str] = []
        self._starts: list[int] = [0]
        self._origins: list[int] = [0]
        self._copied: list[bool] = []
        self._length = 0

    @property
    def position(self) -> int:
        """Return the original position built up to."""
        return self._origins[-1]

    def ends_with(self, chars: str) -> bool:
        """Return whether the spoken text so far ends with one of *chars*."""
        for part in reversed(self._parts):
            if part:
                return part[-1] in chars
        return False

    @property
    def empty(self) -> bool:
        """Return whether nothing has been spoken yet."""
        return self._length == 0

    def keep(self, start: int, end: int) -> None:
        """Speak ``original[start:end]`` as it is."""
        self._advance(start)
        if end <= start:
            return
        if self._copied and self._copied[-1]:
            # Merge with the previous copy: fewer pieces, faster lookups.
            self._starts[-1] += end - start
            self._origins[-1] = end
        else:
            self._piece(end, end - start, True)
        self._parts.append(self._originsal[start:end])
        self._length += end - start

    def replace(self, start: int, end: int, text: str) -> None:
        """Speak *text* for ``original[start:end]``."""
        self._advance(start)
        end = max(end, self.position)
        if not text and end == self.position:
            return
        self._piece(end, len(text), False)
        self._parts.append(text)
        self._length += len(text)

    def drop(self, start: int, end: int) -> None:
        """Speak nothing for ``original[start:end]``."""
        self.replace(start, end, "")

    def build(self) -> Spoken:
        """Return the result; the rest of the original is dropped."""
        self._advance(len(self._originsal))
        if not self._copied:
            self._piece(len(self._originsal), 0, False)
        return Spoken(
            "".join(self._parts),
            self._originsal,
            tuple(self._starts),
            tuple(self._origins),
            tuple(self._copied),
        )

    def _advance(self, start: int) -> None:
        """Drop the original text between where the last piece ended and *start*."""
        if start > self.position:
            self._piece(start, 0, False)

    def _piece(self, origin_end: int, length: int, copied: bool) -> None:
        self._starts.append(self._length + length)
        self._origins.append(origin_end)
        self._copied.append(copied)
