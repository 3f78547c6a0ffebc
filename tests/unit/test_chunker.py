"""Tests for the sentence chunker: where a streamed reply is cut for speech."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.service.chunker import SentenceChunker

Pieces = Callable[[str], Iterator[str]]


def whole(text: str) -> Iterator[str]:
    yield text


def by_char(text: str) -> Iterator[str]:
    yield from text


def random_pieces(text: str) -> Iterator[str]:
    rng = random.Random(text)
    i = 0
    while i < len(text):
        size = rng.randint(1, 9)
        yield text[i : i + size]
        i += size


def chunk(pieces: Iterator[str], **options: int) -> list[str]:
    chunker = SentenceChunker(**options)
    segments = [segment for piece in pieces for segment in chunker.feed(piece)]
    return segments + chunker.flush()


def case(name: str, text: str, expected: list[str], **options: int) -> Any:
    return pytest.param(text, expected, options, id=name)


TINY = {"min_chars": 1, "first_min_chars": 1}

CASES = [
    # Abbreviations
    case(
        "titles",
        "Dr. Smith met Mr. Jones and Mrs. Brown at St. Mary's. They talked.",
        ["Dr. Smith met Mr. Jones and Mrs. Brown at St. Mary's.", "They talked."],
    ),
    case(
        "prof-vs",
        "Prof. Lee compared apples vs. oranges. It was fun to watch.",
        ["Prof. Lee compared apples vs. oranges.", "It was fun to watch."],
    ),
    case(
        "etc-mid-sentence",
        "Bring snacks, drinks, etc. and some chairs. See you there soon.",
        ["Bring snacks, drinks, etc. and some chairs.", "See you there soon."],
    ),
    case(
        "eg-ie",
        "Pick a fruit, e.g. an apple, i.e. something sweet. Then rest a while.",
        ["Pick a fruit, e.g. an apple, i.e. something sweet.", "Then rest a while."],
    ),
    case(
        "us-acronym",
        "The U.S. economy grew fast last year. Markets rallied.",
        ["The U.S. economy grew fast last year.", "Markets rallied."],
    ),
    case(
        "time-ends-sentence",
        "The shop opens at 9 a.m. Bring your own bag.",
        ["The shop opens at 9 a.m.", "Bring your own bag."],
    ),
    case(
        "time-mid-sentence",
        "We open at 9 a.m. and close at 5 p.m. on weekdays. Come by.",
        ["We open at 9 a.m. and close at 5 p.m. on weekdays.", "Come by."],
    ),
    case(
        "initials",
        "J. R. R. Tolkien wrote The Hobbit. It is a classic.",
        ["J. R. R. Tolkien wrote The Hobbit.", "It is a classic."],
    ),
    case(
        "before-numbers",
        "See Fig. 3 and No. 5 for the details. They explain it.",
        ["See Fig. 3 and No. 5 for the details.", "They explain it."],
    ),
    case(
        "no-ends-sentence",
        "The answer is simply no. Please ask again later.",
        ["The answer is simply no.", "Please ask again later."],
    ),
    # Numbers
    case(
        "decimals",
        "Pi is about 3.14 and e is about 2.72. Math is fun.",
        ["Pi is about 3.14 and e is about 2.72.", "Math is fun."],
    ),
    case(
        "price",
        "A coffee costs $3.50 here. Tea is cheaper.",
        ["A coffee costs $3.50 here.", "Tea is cheaper."],
    ),
    case(
        "thousands-and-clock",
        "He paid 3,000 dollars at 10:30; then he left.",
        ["He paid 3,000 dollars at 10:30; then he left."],
    ),
    # Ellipses
    case(
        "ellipsis-then-lowercase",
        "Wait... what did you say? I missed it.",
        ["Wait... what did you say?", "I missed it."],
    ),
    case(
        "ellipsis-then-uppercase",
        "Well... That is odd indeed. Let me check.",
        ["Well... That is odd indeed.", "Let me check."],
    ),
    case(
        "ellipsis-char",
        "Hmm…maybe later, I think. Okay then, bye.",
        ["Hmm…maybe later, I think.", "Okay then, bye."],
    ),
    # URLs and e-mail
    case(
        "url",
        "Visit https://example.com/a.b/c.html?x=1 for more. It has the docs.",
        ["Visit https://example.com/a.b/c.html?x=1 for more.", "It has the docs."],
    ),
    case(
        "email-and-domain",
        "Write to foo@bar.com or see example.org today. Thanks!",
        ["Write to foo@bar.com or see example.org today.", "Thanks!"],
    ),
    case(
        "domain-ends-sentence",
        "The site is example.com. It is down again.",
        ["The site is example.com.", "It is down again."],
    ),
    # Lists and line breaks
    case(
        "numbered-list",
        "Steps:\n1. Open the box.\n2. Take out the phone.\n3. Charge it.",
        ["Steps:\n1. Open the box.", "2. Take out the phone.", "3. Charge it."],
    ),
    case(
        "numbered-list-no-stops",
        "1. First item\n2. Second item",
        ["1. First item", "2. Second item"],
    ),
    case(
        "line-break-lowercase-continues",
        "Line one of the poem\nLine two of the poem\nand its end",
        ["Line one of the poem", "Line two of the poem\nand its end"],
    ),
    case(
        "paragraphs",
        "First paragraph here.\n\nSecond one.",
        ["First paragraph here.", "Second one."],
    ),
    case("paragraph-beats-merging", "Hi.\n\nThere.", ["Hi.", "There."]),
    case("surrounding-whitespace", "  \n Hello there, world!  \n", ["Hello there, world!"]),
    # Quotes and brackets
    case(
        "quote-after-stop",
        'He said "Stop." Then he left.',
        ['He said "Stop."', "Then he left."],
    ),
    case(
        "bracket-after-stop",
        "(See the note above.) Next we go on.",
        ["(See the note above.)", "Next we go on."],
    ),
    case(
        "curly-quotes",
        "She asked, “Are you sure?” Nobody answered her.",
        ["She asked, “Are you sure?”", "Nobody answered her."],
    ),
    case(
        "quote-then-lowercase",
        '"Really?" she asked him quietly. He nodded.',
        ['"Really?" she asked him quietly.', "He nodded."],
    ),
    case(
        "markdown-bold",
        "**This is the summary.** Details follow below.",
        ["**This is the summary.**", "Details follow below."],
    ),
    # Other scripts
    case(
        "chinese-merged",
        "今天天气很好。我们去公园散步吧！你想一起来吗？",
        ["今天天气很好。我们去公园散步吧！", "你想一起来吗？"],
    ),
    case(
        "chinese",
        "今天天气很好。我们去公园散步吧！你想一起来吗？",
        ["今天天气很好。", "我们去公园散步吧！", "你想一起来吗？"],
        min_chars=5,
        first_min_chars=3,
    ),
    case("cjk-brackets", "「你好。」他说。", ["「你好。」", "他说。"], **TINY),
    case("japanese", "ありがとう。また明日！", ["ありがとう。", "また明日！"], **TINY),
    case(
        "hindi",
        "नमस्ते दोस्तों। आज हम एक नई चीज़ सीखेंगे। चलिए शुरू करते हैं॥",
        ["नमस्ते दोस्तों।", "आज हम एक नई चीज़ सीखेंगे।", "चलिए शुरू करते हैं॥"],
    ),
    case(
        "arabic",
        "كيف حالك اليوم يا صديقي؟ أنا بخير، شكرا جزيلا لك.",
        ["كيف حالك اليوم يا صديقي؟", "أنا بخير، شكرا جزيلا لك."],
    ),
    case("urdu", "آپ کیسے ہیں۔ میں ٹھیک ہوں۔", ["آپ کیسے ہیں۔", "میں ٹھیک ہوں۔"], **TINY),
    case("armenian", "Բարև ձեզ։ Ինչպե՞ս եք։", ["Բարև ձեզ։", "Ինչպե՞ս եք։"], **TINY),
    case("ethiopic", "ሰላም ነው። እንዴት ነህ።", ["ሰላም ነው።", "እንዴት ነህ።"], **TINY),
    # Short sentences are merged
    case(
        "short-first-merged",
        "Hi. How are you today, my friend?",
        ["Hi. How are you today, my friend?"],
    ),
    case(
        "first-needs-first-min",
        "Yes. No. Maybe so. I think we should go now.",
        ["Yes. No.", "Maybe so. I think we should go now."],
    ),
    case(
        "later-need-min",
        "This is the first sentence. Ok. Sure. And here is the last one.",
        ["This is the first sentence.", "Ok. Sure. And here is the last one."],
    ),
    case(
        "short-last-at-flush",
        "This is a longer opening sentence. Bye.",
        ["This is a longer opening sentence.", "Bye."],
    ),
    # Long runs are split
    case(
        "split-at-space",
        "one two three four five six seven eight nine ten eleven twelve",
        ["one two three four five six seven eight", "nine ten eleven twelve"],
        max_chars=40,
        first_max_chars=40,
    ),
    case(
        "split-at-clauses",
        "We went to the market, bought some apples and pears, then walked home along the river.",
        [
            "We went to the market,",
            "bought some apples and pears,",
            "then walked home along the river.",
        ],
        max_chars=50,
        first_max_chars=50,
    ),
    case(
        "digits-without-end",
        "1" * 45,
        ["1" * 20, "1" * 20, "1" * 5],
        max_chars=20,
        first_max_chars=20,
    ),
    case(
        "long-word-split",
        "Supercalifragilisticexpialidocious indeed",
        ["Supercalifragilistic", "expialidocious", "indeed"],
        max_chars=20,
        first_max_chars=20,
    ),
    # The first segment comes early
    case(
        "first-cut-at-clause",
        "Well, I think the answer depends on a great many things, including your budget "
        "and your timeline. Let me explain.",
        [
            "Well, I think the answer depends on a great many things,",
            "including your budget and your timeline.",
            "Let me explain.",
        ],
    ),
    case(
        "first-without-clause-waits",
        "This very long first sentence has no commas at all and simply keeps going on. Done.",
        ["This very long first sentence has no commas at all and simply keeps going on.", "Done."],
    ),
    case(
        "only-first-cut-early",
        "Sure thing. The second sentence is long, much longer than sixty characters, and whole.",
        [
            "Sure thing.",
            "The second sentence is long, much longer than sixty characters, and whole.",
        ],
    ),
    # Odd endings
    case(
        "repeated-marks",
        "What?! You did what?? Wow!!! That is amazing.",
        ["What?! You did what??", "Wow!!! That is amazing."],
    ),
    case("no-final-stop", "This sentence never ends", ["This sentence never ends"]),
    case("empty", "", []),
    case("whitespace-only", "   \n\n  \t ", []),
]


@pytest.mark.parametrize("pieces", [whole, by_char, random_pieces])
@pytest.mark.parametrize(("text", "expected", "options"), CASES)
def test_segments(text: str, expected: list[str], options: dict[str, int], pieces: Pieces) -> None:
    assert chunk(pieces(text), **options) == expected


def test_sentence_is_released_once_its_end_is_certain() -> None:
    chunker = SentenceChunker()
    assert chunker.feed("It costs $3.") == []
    assert chunker.feed("50 today") == []
    assert chunker.feed(". ") == []
    assert chunker.feed("Fine") == ["It costs $3.50 today."]
    assert chunker.flush() == ["Fine"]


def test_full_width_stop_is_released_without_a_space() -> None:
    chunker = SentenceChunker()
    assert chunker.feed("你好，今天天气很好。") == []
    assert chunker.feed("我") == ["你好，今天天气很好。"]


def test_first_clause_is_released_before_the_sentence_ends() -> None:
    chunker = SentenceChunker(first_min_chars=8, first_max_chars=40)
    assert chunker.feed("Good question, and the short answer is that it ") == ["Good question,"]


def test_flush_starts_a_new_text() -> None:
    chunker = SentenceChunker()
    assert chunker.feed("Hi. Yo. Hello") == []
    assert chunker.flush() == ["Hi. Yo. Hello"]
    assert chunker.flush() == []
    assert chunker.feed("Hi. How are you today? Fine") == ["Hi. How are you today?"]


@pytest.mark.parametrize(
    "options",
    [{"first_min_chars": 0}, {"first_min_chars": 70}, {"max_chars": 50}, {"min_chars": -1}],
)
def test_rejects_inconsistent_limits(options: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SentenceChunker(**options)


TRICKY = [
    *("Dr.", "Mr.", "e.g.", "U.S.", "a.m.", "etc.", "J.", "No.", "1.", "3.14", "$3.", "50"),
    *(".", "...", "…", "?!", "!", "?", ",", ";", ":", " — ", '"', "'", ")", "(", "**"),
    *("。", "！", "，", "।", "؟", "\n", "\n\n", " ", " ", " ", "  "),
    *("word", "Word", "sentence", "and", "It", "x" * 45, "https://a.b/c.d", "foo@bar.com"),
]
# Marks that end a sentence or clause even where no space follows, so a cut may split a
# whitespace-delimited "word" of text in these scripts.
CUT_WITHOUT_SPACE = frozenset("。！？｡।॥؟۔։።፧\u037e，、；：")
texts = st.one_of(
    st.lists(st.sampled_from(TRICKY), max_size=80).map("".join), st.text(max_size=200)
)


@settings(max_examples=300)
@given(
    text=texts,
    rng=st.randoms(use_true_random=False),
    min_chars=st.integers(0, 40),
    max_chars=st.integers(20, 120),
    first=st.tuples(st.integers(1, 20), st.integers(0, 60)),
)
def test_any_text(
    text: str,
    rng: random.Random,
    min_chars: int,
    max_chars: int,
    first: tuple[int, int],
) -> None:
    first_min = min(first[0], max_chars)
    first_max = min(first_min + first[1], max_chars)
    options = {
        "min_chars": min_chars,
        "max_chars": max_chars,
        "first_min_chars": first_min,
        "first_max_chars": first_max,
    }
    segments = chunk(whole(text), **options)

    # Same segments however the text is split into deltas.
    assert chunk(by_char(text), **options) == segments
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 12))) if text else []
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert chunk(iter(pieces), **options) == segments

    # Every segment is stripped, non-empty and the next stretch of the text.
    pos = 0
    for segment in segments:
        assert segment and segment == segment.strip()
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        assert text.startswith(segment, pos)
        pos += len(segment)
    assert not text[pos:].strip()
    if CUT_WITHOUT_SPACE.isdisjoint(text) and all(len(w) <= max_chars for w in text.split()):
        assert " ".join(segments).split() == text.split()

    # No segment runs over the limit, not even one long word.
    assert all(len(s) <= max_chars for s in segments)


def test_cut_speaks_what_is_buffered_and_the_text_goes_on() -> None:
    chunker = SentenceChunker()
    assert chunker.feed("The price is $3.") == []
    assert chunker.cut() == ["The price is $3."]
    assert chunker.feed("50 today. Then") == []
    assert chunker.cut() == ["50 today. Then"]  # short sentences join, as ever
    assert chunker.cut() == []  # nothing buffered: nothing to say
    assert chunker.feed("  more words") == []
    assert chunker.flush() == ["more words"]


def _chunk_with_cuts(parts: list[list[str]]) -> list[str]:
    """Feed each part's pieces, cutting after every part but the last; then flush."""
    chunker = SentenceChunker()
    segments: list[str] = []
    for n, pieces in enumerate(parts):
        for piece in pieces:
            segments += chunker.feed(piece)
        if n < len(parts) - 1:
            segments += chunker.cut()
    return segments + chunker.flush()


@settings(max_examples=200)
@given(
    text=texts,
    rng=st.randoms(use_true_random=False),
    flushes=st.lists(st.integers(0, 200), max_size=4),
)
def test_cuts_give_the_same_segments_however_the_pieces_fall(
    text: str, rng: random.Random, flushes: list[int]
) -> None:
    bounds = sorted({min(f, len(text)) for f in flushes})
    parts = [text[i:j] for i, j in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    segments = _chunk_with_cuts([[part] for part in parts])

    def pieces_of(part: str) -> list[str]:
        out, i = [], 0
        while i < len(part):
            size = rng.randint(1, 7)
            out.append(part[i : i + size])
            i += size
        return out

    assert _chunk_with_cuts([pieces_of(part) for part in parts]) == segments
    # A cut adds cut points only: every character but whitespace is there once, in order.
    assert "".join("".join(segments).split()) == "".join(text.split())
    assert all(s and s == s.strip() for s in segments)
