"""Make a segment speakable: markdown read as plain text, emoji dropped, numbers as words.

:class:`TextNormalizer` takes the segments of one stream, in order, and returns each
as a :class:`~.spoken.Spoken`: what the engine is given, with a map back to the
segment. It runs in three steps, each a rewrite whose map composes with the last:

1. markdown (any language), read with markdown-it-py: emphasis markers, heading
   ``#``, list bullets and numbers, block quote ``>``, link targets, images, HTML
   tags, rules and tables are not spoken; link text and inline code are. Fenced code
   is not spoken at all. A table is skipped whole rather than read cell by cell: a
   grid read aloud is noise, and the reply's prose around it usually says what it
   shows. Block boundaries (a heading, list items) become sentence breaks.
2. emoji (any language) are dropped.
3. English only: numbers, currency, dates, times and the like become words
   (:mod:`.verbalize`).

A segment is a stripped slice of the reply, cut by the chunker, and code fences and
tables span several; so the normalizer keeps, between segments, whether it is
inside a fence or a table. The chunker always cuts at a blank line, so one segment
never holds one, and a line that opens a fence or starts with ``|`` is recognised
line by line before markdown-it sees the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import emoji
from markdown_it import MarkdownIt
from markdown_it.helpers import parseLinkDestination, parseLinkTitle
from markdown_it.token import Token

from .spoken import Spoken, SpokenBuilder
from .verbalize import verbalize

__all__ = ["TextNormalizer"]

# Anything markdown-it could read as syntax; a segment with none of it is plain text.
_MARKUP = re.compile(
    r"[*_`\[\]#<>|~\\&!]|(?:^|\r)[ \t]*(?:[-+=]+|\d{1,9}[.)])(?:[ \t]|$|\r)", re.MULTILINE
)
_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Characters that may start an emoji (or take part in one); text without them has none.
_EMOJI_HINT = re.compile("[\u00a9\u00ae\u203c-\u32ff\U0001f000-\U0001faff\ufe0f\u200d]")
# A heading or list item without closing punctuation ends a sentence all the same.
_SENTENCE_END = ".!?:;…。！？"
_NO_SPACE = " \t\n"


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    # Fences are followed line by line across segments; indented code cannot occur in
    # a stripped segment without blank lines, and an indented line is prose here.
    # text_join would fold escapes into plain text and lose their source form.
    md.disable(["fence", "code", "text_join"])
    return md


_MD = _markdown()


@dataclass(frozen=True, slots=True)
class _Fence:
    """An open code fence: its character and length, which its closing line repeats."""

    char: str
    length: int

    def closed_by(self, line: str) -> bool:
        stripped = line.strip()
        return len(stripped) >= self.length and stripped == self.char * len(stripped)


class TextNormalizer:
    """Turn the segments of one stream into what a speech engine should read.

    *language* is the voice's language code: normalization of numbers and the like
    applies to English ("en", "en-us", ...) only; markdown and emoji are handled for
    every language.
    """

    def __init__(self, *, language: str = "en") -> None:
        self._english = language.lower().replace("_", "-").split("-")[0] == "en"
        self._fence: _Fence | None = None
        self._table = False

    def normalize(self, segment: str) -> Spoken:
        """Return the spoken form of the next segment of the stream."""
        if not segment:
            return Spoken.verbatim(segment)
        if self._fence is None and not self._table and not _MARKUP.search(segment):
            spoken = Spoken.verbatim(segment)
        else:
            spoken = self._read_markdown(segment)
        if _EMOJI_HINT.search(spoken.text):
            spoken = _drop_emoji(spoken)
        if self._english:
            spoken = spoken.rewrite(verbalize(spoken.text))
        return spoken

    def _read_markdown(self, segment: str) -> Spoken:
        """Read *segment* as markdown; carry open fences and tables to the next one."""
        out = SpokenBuilder(segment)
        run_start: int | None = None  # start of the lines markdown-it reads together
        ends = [m.end() for m in _LINE_BREAK.finditer(segment)]
        if not ends or ends[-1] < len(segment):
            ends.append(len(segment))
        for start, end in zip([0, *ends], ends, strict=False):
            if self._skips(segment[start:end]):
                if run_start is not None:
                    _read_blocks(out, segment, run_start, start)
                    run_start = None
            elif run_start is None:
                run_start = start
        if run_start is not None:
            _read_blocks(out, segment, run_start, len(segment))
        return out.build()

    def _skips(self, line: str) -> bool:
        """Follow fences and tables through *line*; return whether it is not spoken."""
        if self._fence is not None:
            if self._fence.closed_by(line):
                self._fence = None
            return True
        opening = _FENCE.match(line)
        if opening is not None:
            fence = opening.group(1)
            if fence[0] == "~" or "`" not in line[opening.end() :]:
                self._fence = _Fence(fence[0], len(fence))
                return True
        stripped = line.strip()
        if stripped.startswith("|") or (self._table and "|" in stripped):
            self._table = True
            return True
        self._table = False
        return False


def _read_blocks(out: SpokenBuilder, source: str, start: int, end: int) -> None:
    """Speak the prose of ``source[start:end]``, read as markdown blocks."""
    text = source[start:end]
    # Lines as markdown-it counts them in token.map.
    line_starts = [0, *(m.end() for m in _LINE_BREAK.finditer(text)), len(text)]
    last_line = len(line_starts) - 1
    tokens = _MD.parse(text)
    skip_until = -1
    for index, token in enumerate(tokens):
        if index < skip_until:
            continue
        if token.type == "table_open":
            skip_until = _closing(tokens, index)
            continue
        if token.type != "inline" or token.map is None or not token.children:
            continue
        low = line_starts[min(token.map[0], last_line)]
        high = line_starts[min(token.map[1], last_line)]
        if not out.empty and not out.ends_with(_NO_SPACE):
            # A new block: a sentence break after a heading or list item with no stop.
            separator = " " if out.ends_with(_SENTENCE_END) else ". "
            out.replace(out.position, out.position, separator)
        _read_inline(out, source, token.children, start + low, start + high)


def _closing(tokens: list[Token], index: int) -> int:
    """Return the index after the token that closes the one at *index*."""
    depth = 0
    for i in range(index, len(tokens)):
        depth += tokens[i].nesting
        if depth == 0:
            return i + 1
    return len(tokens)


def _read_inline(
    out: SpokenBuilder, source: str, children: list[Token], pos: int, end: int
) -> None:
    """Align markdown-it's inline tokens with ``source[pos:end]`` and speak their text.

    markdown-it's inline tokens carry no offsets, but their text appears in the
    source in order, so each is found from where the last one ended; what lies
    between (markers, link targets) is dropped.
    """
    skip = 0
    for i, child in enumerate(children):
        if i < skip:
            continue
        kind = child.type
        if kind in ("text", "code_inline"):
            found = source.find(child.content, pos, end) if child.content else -1
            if found >= 0:
                out.keep(found, found + len(child.content))
                pos = found + len(child.content)
            elif child.content:
                out.replace(pos, pos, child.content)
        elif kind == "text_special":  # a backslash escape or an entity
            found = source.find(child.markup, pos, end)
            if found >= 0:
                out.replace(found, found + len(child.markup), child.content)
                pos = found + len(child.markup)
        elif kind in ("softbreak", "hardbreak"):
            found = source.find("\n", pos, end)
            if found >= 0:
                out.keep(found, found + 1)
                pos = found + 1
        elif kind == "html_inline":
            found = source.find(child.content, pos, end)
            if found >= 0:
                pos = found + len(child.content)
        elif kind == "link_open" and child.markup == "autolink":
            # The text of an autolink is its target: not spoken.
            skip = _closing_inline(children, i)
            found = source.find(">", pos, end)
            pos = found + 1 if found >= 0 else pos
        elif kind == "link_close":
            pos = _skip_target(source, pos, end)
        elif kind == "image":
            found = source.find("![", pos, end)
            if found >= 0:
                bracket = source.find("]", found, end)
                pos = _skip_target(source, bracket if bracket >= 0 else found, end)
    out.drop(pos, max(pos, end))


def _closing_inline(children: list[Token], index: int) -> int:
    depth = 0
    for i in range(index, len(children)):
        depth += children[i].nesting
        if depth == 0:
            return i + 1
    return len(children)


def _skip_target(source: str, pos: int, end: int) -> int:
    """Return the position after a link's ``](target "title")`` or ``][label]`` at *pos*."""
    bracket = source.find("]", pos, end)
    if bracket < 0:
        return pos
    after = bracket + 1
    if after < end and source[after] == "(":
        at = after + 1
        while at < end and source[at] in " \t\n":
            at += 1
        destination = parseLinkDestination(source, at, end)
        if destination.ok:
            at = destination.pos
            while at < end and source[at] in " \t\n":
                at += 1
            title = parseLinkTitle(source, at, end)
            if title.ok:
                at = title.pos
        close = source.find(")", at, end)
        return close + 1 if close >= 0 else after
    if after < end and source[after] == "[":
        close = source.find("]", after, end)
        return close + 1 if close >= 0 else after
    return after


def _drop_emoji(spoken: Spoken) -> Spoken:
    """Drop the emoji of *spoken*, leaving a space where one stood between two words."""
    text = spoken.text
    runs: list[list[int]] = []  # emoji side by side go as one
    for match in emoji.emoji_list(text):
        start, end = match["match_start"], match["match_end"]
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    edits = []
    last = 0
    for start, end in runs:
        space_before = start == 0 or text[start - 1].isspace()
        word_after = end < len(text) and not text[end].isspace()
        if space_before and not (word_after and text[end].isalnum()):
            # Take the space before along: "Done! 🎉" and "world 🇫🇷!" leave none.
            while start > last and text[start - 1].isspace():
                start -= 1
            edits.append((start, end, ""))
        else:
            edits.append((start, end, " " if word_after and not space_before else ""))
        last = end
    return spoken.rewrite(edits)
