"""Make a stream's segments speakable: normalization, then the operator's lexicon.

One :class:`SpeakableText` per process holds the lexicon (reloaded on SIGHUP); each
stream asks it for a shaper that keeps the stream's markdown state across segments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .lexicon import Lexicon, LexiconError
from .normalize import TextNormalizer
from .spoken import Spoken

__all__ = ["SpeakableText"]

log = logging.getLogger(__name__)


class SpeakableText:
    """The lexicon in force, and a shaper of segments for each stream."""

    def __init__(self, lexicon_file: Path | None) -> None:
        self.lexicon_file = lexicon_file
        self.lexicon = Lexicon.load(lexicon_file) if lexicon_file is not None else None

    def reload(self) -> bool:
        """Read the lexicon file again; keep the lexicon in force if it cannot be read."""
        if self.lexicon_file is None:
            return False
        try:
            self.lexicon = Lexicon.load(self.lexicon_file)
        except (OSError, LexiconError) as exc:
            log.error(
                "cannot read the lexicon; keeping the one in force",
                extra={"event": "lexicon", "error": str(exc)},
            )
            return False
        log.info("lexicon loaded", extra={"event": "lexicon"})
        return True

    def shaper(self, *, normalize: bool, language: str) -> Callable[[str], Spoken]:
        """Return what turns each segment of one stream into what the engine is given."""
        normalizer = TextNormalizer(language=language) if normalize else None
        lexicon = self.lexicon

        def shape(segment: str) -> Spoken:
            spoken = normalizer.normalize(segment) if normalizer else Spoken.verbatim(segment)
            return lexicon.apply(spoken) if lexicon is not None else spoken

        return shape
