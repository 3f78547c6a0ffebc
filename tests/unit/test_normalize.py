"""Tests for text normalization: markdown, emoji, and English numbers as words."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.service.chunker import SentenceChunker
from voxrelay.service.normalize import TextNormalizer
from voxrelay.service.spoken import Spoken


def say(text: str, *, language: str = "en") -> str:
    return TextNormalizer(language=language).normalize(text).text


def origin_of(spoken: Spoken, words: str) -> str:
    """Return the original text that the spoken *words* were made from."""
    start = spoken.text.index(words)
    low, high = spoken.original_span(start, start + len(words))
    return spoken.original[low:high]


# One table per class: input → what the engine is given.

NUMBERS = [
    ("The 3 cats and 12 dogs.", "The three cats and twelve dogs."),
    ("Pi is 3.14 today.", "Pi is three point one four today."),
    (
        "About 1,234,567 people.",
        "About one million two hundred and thirty-four thousand "
        "five hundred and sixty-seven people.",
    ),
    ("It fell to -5 overnight.", "It fell to minus five overnight."),
    ("It fell to −5 overnight.", "It fell to minus five overnight."),
    ("Add 1/2 cup or 3/4 cup.", "Add one half cup or three quarters cup."),
    ("Two 2/3 and 1/10 parts.", "Two two thirds and one tenth parts."),
    ("Open 24/7 daily.", "Open twenty-four/seven daily."),
    ("Agent 007 waits.", "Agent zero zero seven waits."),
    (
        "Order 12345678901 shipped.",
        "Order one two three four five six seven eight nine zero one shipped.",
    ),
    ("Pages 3-5 and 7–9.", "Pages three to five and seven to nine."),
    ("From 2000-2010 it grew.", "From two thousand to twenty ten it grew."),
    ("We have 10k users and 5M views.", "We have ten thousand users and five million views."),
    ("COVID-19 and MP3 stay.", "COVID-nineteen and MP3 stay."),
]
CURRENCY = [
    ("It costs $3.50 today.", "It costs three dollars fifty today."),
    ("Just $1.", "Just one dollar."),
    ("Only $0.99 here.", "Only ninety-nine cents here."),
    ("Pay $2,000 now.", "Pay two thousand dollars now."),
    ("That is €20.", "That is twenty euros."),
    ("Revenue was £1.5m.", "Revenue was one point five million pounds."),
    ("A $2.5 billion deal.", "A two point five billion dollars deal."),
    ("It is ¥500.", "It is five hundred yen."),
]
PERCENT = [
    ("Growth was 3.5% in total.", "Growth was three point five percent in total."),
    ("Up 12 % today.", "Up twelve percent today."),
    ("Down -2% now.", "Down minus two percent now."),
]
ORDINALS = [
    ("He came 1st, 2nd and 3rd.", "He came first, second and third."),
    ("The 21st century.", "The twenty-first century."),
    ("Her 100th win.", "Her one hundredth win."),
]
YEARS = [
    ("In 1999 it rained.", "In nineteen ninety-nine it rained."),
    ("It was 1984.", "It was nineteen eighty-four."),
    ("Since 2026 we sing.", "Since twenty twenty-six we sing."),
    ("Born in 1066.", "Born in ten sixty-six."),
    ("The 1990s were loud.", "The nineteen nineties were loud."),
    ("The 80s were too.", "The eighties were too."),
    ("There were 1999 people.", "There were one thousand nine hundred and ninety-nine people."),
]
DATES = [
    ("On 2026-12-06 we meet.", "On December sixth, twenty twenty-six we meet."),
    ("On 12/06/2026 we meet.", "On December sixth, twenty twenty-six we meet."),
    ("On 31/12/2026 we part.", "On December thirty-first, twenty twenty-six we part."),
    ("See you Dec 6 then.", "See you December sixth then."),
    ("See you Dec. 6th, 2026 then.", "See you December sixth, twenty twenty-six then."),
    ("By 6 December 2026 it ends.", "By the sixth of December twenty twenty-six it ends."),
    ("By the 3rd of January.", "By the third of January."),
]
TIMES = [
    ("Meet at 3:30 pm today.", "Meet at three thirty p m today."),
    ("Meet at 7:05 am.", "Meet at seven oh five a m."),
    ("Meet at 7:05pm today.", "Meet at seven oh five p m today."),
    ("Open at 10:00 sharp.", "Open at ten o'clock sharp."),
    ("Land at 15:00 sharp.", "Land at fifteen hundred sharp."),
    ("Land at 23:45 sharp.", "Land at twenty-three forty-five sharp."),
    ("Wake at 9am daily.", "Wake at nine a m daily."),
    ("Sleep at 10 p.m. Then rest.", "Sleep at ten p m. Then rest."),
]
PHONES = [
    ("Call 555-123-4567 now.", "Call five five five, one two three, four five six seven now."),
    ("Call (555) 123-4567 now.", "Call five five five, one two three, four five six seven now."),
    ("Call 555-1234 now.", "Call five five five, one two three four now."),
    (
        "Call +44 20 7946 0958 now.",
        "Call plus four four, two zero, seven nine four six, zero nine five eight now.",
    ),
]
UNITS = [
    ("Run 5 km today.", "Run five kilometers today."),
    ("Run 1 km today.", "Run one kilometer today."),
    ("It was 20°C outside.", "It was twenty degrees Celsius outside."),
    ("Lift 10 kg now.", "Lift ten kilograms now."),
    ("Store 3 GB there.", "Store three gigabytes there."),
    ("Drive 100 mph fast.", "Drive one hundred miles per hour fast."),
    ("Wait 250 ms more.", "Wait two hundred and fifty milliseconds more."),
    ("Drink 1.5 L daily.", "Drink one point five liters daily."),
]
ABBREVIATIONS = [
    ("Dr. Smith is in.", "Doctor Smith is in."),
    ("Live at 5 Elm Dr. now.", "Live at five Elm Drive now."),
    ("Turn on Main St., then left.", "Turn on Main Street, then left."),
    ("Visit St. Paul's.", "Visit Saint Paul's."),
    ("Mr. and Mrs. Smith.", "Mister and Missus Smith."),
    ("Fruit, e.g. apples.", "Fruit, for example apples."),
    ("Fruit, i.e. apples.", "Fruit, that is apples."),
    ("Apples, pears, etc.", "Apples, pears, et cetera."),
    ("Apples etc. Pears too.", "Apples et cetera. Pears too."),
    ("Cats vs. dogs.", "Cats versus dogs."),
    ("Cats vs dogs.", "Cats versus dogs."),
    ("Salt & pepper.", "Salt and pepper."),
    ("Room No. 5 now.", "Room number five now."),
    ("Order #12 ships.", "Order number twelve ships."),
    ("The first step.", "The first step."),  # "st." inside a word is no abbreviation
]
PLAIN = [
    ("Hello there, how are you?", "Hello there, how are you?"),
    ("", ""),
]


@pytest.mark.parametrize(
    ("text", "spoken"),
    NUMBERS
    + CURRENCY
    + PERCENT
    + ORDINALS
    + YEARS
    + DATES
    + TIMES
    + PHONES
    + UNITS
    + ABBREVIATIONS
    + PLAIN,
)
def test_english_is_spoken_as_words(text: str, spoken: str) -> None:
    assert say(text) == spoken


@pytest.mark.parametrize(
    ("text", "words", "origin"),
    [
        ("It costs $3.50 today.", "three dollars fifty", "$3.50"),
        ("It costs $3.50 today.", "fifty", "$3.50"),
        ("It costs $3.50 today.", "today", "today"),
        ("See you Dec 6 then.", "December", "Dec"),
        ("See you Dec 6 then.", "sixth", "6"),
        ("Run 5 km today.", "kilometers", "km"),
        ("Run 5km today.", "kilometers", "5km"),
        ("Meet at 3:30 pm today.", "three thirty", "3:30"),
        ("Meet at 3:30 pm today.", "p m", "pm"),
        ("By 6 December 2026 it ends.", "twenty twenty-six", "2026"),
        ("Dr. Smith is in.", "Doctor", "Dr."),
        ("**Bold** move.", "Bold", "Bold"),
        ("See [the docs](https://x.org/the) now.", "docs", "docs"),
        ("See [the docs](https://x.org/the) now.", "now", "now"),
        ("Hi 🎉 there.", "there", "there"),
    ],
)
def test_spoken_words_map_back_to_what_they_say(text: str, words: str, origin: str) -> None:
    assert origin_of(TextNormalizer().normalize(text), words) == origin


MARKDOWN = [
    ("**Bold** and _em_ and ~~gone~~.", "Bold and em and gone."),
    ("# A heading", "A heading"),
    ("## Steps\nFirst do this.", "Steps. First do this."),
    ("- apples\n- pears", "apples. pears"),
    ("1. First step\n2. Second step", "First step. Second step"),
    ("> Quoted words.", "Quoted words."),
    ('See [the docs](https://example.com/a_b "Title") now.', "See the docs now."),
    ("Use `pip install` here.", "Use pip install here."),
    ("An ![image](x.png) here.", "An  here."),
    ("Visit <https://example.com> now.", "Visit  now."),
    ("Tags <b>bold</b> go.", "Tags bold go."),
    ("Escaped \\*stars\\* stay.", "Escaped *stars* stay."),
    ("Ham &amp; eggs.", "Ham and eggs."),
    ("Rule below\n\n---", "Rule below"),
    ("Not **closed emphasis.", "Not **closed emphasis."),
]


@pytest.mark.parametrize(("text", "spoken"), MARKDOWN)
def test_markdown_is_read_as_plain_text(text: str, spoken: str) -> None:
    assert say(text) == spoken


def test_markdown_is_read_in_every_language_and_numbers_only_in_english() -> None:
    assert say("**Il** coûte 3 €.", language="fr") == "Il coûte 3 €."
    assert say("Es kostet $3.50 🎉", language="de") == "Es kostet $3.50"
    assert say("It costs $3.50", language="en-GB") == "It costs three dollars fifty"


def normalize_all(segments: list[str]) -> list[str]:
    normalizer = TextNormalizer()
    return [normalizer.normalize(segment).text for segment in segments]


def test_a_code_fence_is_skipped_across_segments() -> None:
    segments = ["Here is code:\n```python\nprint(1)", "x = 2", "```\nThen it ends."]
    assert normalize_all(segments) == ["Here is code:", "", "Then it ends."]


def test_a_tilde_fence_needs_its_own_closing_line() -> None:
    segments = ["Look:\n~~~\na = 1\n```", "still code\n~~~~\nDone."]
    assert normalize_all(segments) == ["Look:", "Done."]


def test_a_table_is_skipped_across_segments() -> None:
    segments = ["Compare:\n| Name | Age |\n|---|---|\n| Ann | 3 |", "| Bob | 4 |\nBob is older."]
    assert normalize_all(segments) == ["Compare:", "Bob is older."]


def test_a_table_without_outer_pipes_inside_one_segment_is_skipped() -> None:
    assert say("Name | Age\n--- | ---\nAnn | 3") == ""


def test_the_state_is_per_normalizer() -> None:
    first = TextNormalizer()
    first.normalize("```\ncode")
    assert TextNormalizer().normalize("Plain words.").text == "Plain words."
    assert first.normalize("more code").text == ""


def test_a_chunked_markdown_reply_speaks_its_prose_only() -> None:
    reply = (
        "Here is how:\n\n```python\nimport os\n\nprint(os.getcwd())\n```\n\n"
        "| Tool | Cost |\n|---|---|\n| A | $3 |\n| B | $4 |\n\n"
        "**Done.** It costs $3.50 🎉 in total."
    )
    chunker = SentenceChunker()
    segments = [s for piece in reply.split(" ") for s in chunker.feed(piece + " ")]
    segments += chunker.flush()
    spoken = " ".join(text for text in normalize_all(segments) if text)
    assert spoken == "Here is how: Done. It costs three dollars fifty in total."


EMOJI = [
    ("Hello 👋🏽 world.", "Hello world."),
    ("Great👍thanks.", "Great thanks."),
    ("Done! 🎉", "Done!"),
    ("🎉 Party time.", " Party time."),
    ("Family 👨‍👩‍👧 and flag 🇫🇷!", "Family and flag!"),
    ("Keycap 1️⃣ gone.", "Keycap gone."),
    ("Cheers🎉🎉🎉 all.", "Cheers all."),
    ("Wow 🎉🎉 yes 🎉🎉", "Wow yes"),
    ("Plain text only.", "Plain text only."),
]


@pytest.mark.parametrize(("text", "spoken"), EMOJI)
def test_emoji_are_dropped(text: str, spoken: str) -> None:
    assert say(text) == spoken


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), max_size=4))
def test_normalization_never_raises_and_its_map_is_monotonic(segments: list[str]) -> None:
    normalizer = TextNormalizer()
    for segment in segments:
        spoken = normalizer.normalize(segment)
        assert spoken.original == segment
        positions = [spoken.to_original(i) for i in range(len(spoken.text) + 1)]
        assert positions == sorted(positions)
        assert all(0 <= p <= len(segment) for p in positions)


MARKDOWNISH = st.lists(
    st.sampled_from([*"ab 19$.,%:-*_`#|[]()<>!&\n\r", "km", "pm", "Dec", "🎉", "```"]),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(MARKDOWNISH, min_size=1, max_size=4))
def test_every_spoken_word_comes_from_inside_its_segment(segments: list[str]) -> None:
    normalizer = TextNormalizer()
    for segment in segments:
        spoken = normalizer.normalize(segment)
        for word in re.finditer(r"\S+", spoken.text):
            low, high = spoken.original_span(word.start(), word.end())
            assert 0 <= low <= high <= len(segment)
        for k, copied in enumerate(spoken.copied):
            if copied:
                text = spoken.text[spoken.starts[k] : spoken.starts[k + 1]]
                assert text == segment[spoken.origins[k] : spoken.origins[k + 1]]


def test_carriage_returns_break_lines_as_markdown_reads_them() -> None:
    assert say("# Title\r\n- one\r- two\r\n```\r\ncode\r\n```\r\nEnd.") == "Title. one. two. End."
    assert say("# Title\r\rMore text here\r- item") == "Title. More text here. item"
    assert say("Intro\r- one\r- two") == "Intro. one. two"
