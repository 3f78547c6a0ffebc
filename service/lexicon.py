"""Say chosen words a chosen way: a pronunciation lexicon applied after normalization.

A lexicon file holds one entry per line, ``word<TAB>spoken form``; blank lines and
lines starting with ``#`` are ignored. Entries match whole words of the spoken text,
case-insensitively ("nginx" → "engine x", "SQL" → "sequel"), and the position map
of the :class:`~.spoken.Spoken` they rewrite is kept, so word timings still point at
the caller's text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from .spoken import Spoken

__all__ = ["Lexicon", "LexiconError"]


class LexiconError(ValueError):
    """A lexicon file that cannot be used; the message names the file and line."""


class Lexicon:
    """Whole-word replacements, matched case-insensitively."""

    def __init__(self, entries: Mapping[str, str]) -> None:
        self._entries = {word.casefold(): spoken for word, spoken in entries.items()}
        self._pattern: re.Pattern[str] | None = None
        if self._entries:
            # Longest first, so "New York" wins over "New"; a word is not part of a
            # longer word on either side.
            words = sorted(self._entries, key=len, reverse=True)
            alternatives = "|".join(re.escape(word) for word in words)
            self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        """Read the lexicon file at *path*; raise :class:`LexiconError` on a bad line."""
        path = Path(path)
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LexiconError(f"{path}: cannot read the lexicon: {exc}") from exc
        return cls.parse(content, source=str(path))

    @classmethod
    def parse(cls, content: str, *, source: str = "<lexicon>") -> Lexicon:
        """Read lexicon lines from *content*; *source* names it in errors."""
        entries: dict[str, str] = {}
        seen: dict[str, int] = {}
        for number, raw in enumerate(content.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, tab, spoken = raw.partition("\t")
            word, spoken = word.strip(), spoken.strip()
            where = f"{source}:{number}"
            if not tab:
                raise LexiconError(f"{where}: expected 'word<TAB>spoken form', found no tab")
            if not word or not spoken:
                raise LexiconError(f"{where}: both the word and its spoken form are needed")
            if "\t" in spoken:
                raise LexiconError(f"{where}: more than one tab")
            if not re.fullmatch(r"\S(?:.*\S)?", word) or not (
                word[0].isalnum() or word[-1].isalnum()
            ):
                raise LexiconError(f"{where}: {word!r} is not a word")
            key = word.casefold()
            if key in seen:
                raise LexiconError(f"{where}: {word!r} is already defined on line {seen[key]}")
            seen[key] = number
            entries[word] = spoken
        return cls(entries)

    def apply(self, spoken: Spoken) -> Spoken:
        """Return *spoken* with the lexicon's words replaced by their spoken forms."""
        if self._pattern is None:
            return spoken
        edits = []
        for match in self._pattern.finditer(spoken.text):
            # The regex's case-insensitive match and casefold() can disagree on rare
            # letters; such a match is left as it is.
            replacement = self._entries.get(match.group().casefold())
            if replacement is not None:
                edits.append((match.start(), match.end(), replacement))
        return spoken.rewrite(edits)
