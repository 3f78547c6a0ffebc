"""Tests for Spoken: the map from what an engine is given back to the original text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxrelay.service.spoken import Spoken, SpokenBuilder


def built() -> Spoken:
    """'Pay **$3.50** now' → 'Pay three dollars fifty now'."""
    out = SpokenBuilder("Pay **$3.50** now")
    out.keep(0, 4)  # "Pay "
    out.drop(4, 6)  # "**"
    out.replace(6, 11, "three dollars fifty")
    out.drop(11, 13)
    out.keep(13, 17)  # " now"
    return out.build()


def test_verbatim_maps_every_position_to_itself() -> None:
    spoken = Spoken.verbatim("hello")
    assert not spoken.changed
    assert [spoken.to_original(i) for i in range(6)] == [0, 1, 2, 3, 4, 5]
    assert spoken.original_span(1, 3) == (1, 3)


def test_builder_maps_copies_exactly_and_replacements_to_their_start() -> None:
    spoken = built()
    assert spoken.text == "Pay three dollars fifty now"
    assert spoken.changed
    assert spoken.to_original(0) == 0
    assert spoken.to_original(4) == 6  # "three" comes from "$3.50", past the "**"
    assert spoken.to_original(18) == 6  # "fifty" too
    assert spoken.to_original(23) == 13  # the space after it, past the closing "**"
    assert spoken.to_original(len(spoken.text)) == len(spoken.original)


def test_original_span_of_a_word_inside_a_replacement_is_the_whole_replacement() -> None:
    spoken = built()
    fifty = spoken.text.index("fifty")
    assert spoken.original_span(fifty, fifty + 5) == (6, 11)
    now = spoken.text.index("now")
    assert spoken.original_span(now, now + 3) == (14, 17)
    assert spoken.original_span(3, 3) == (3, 3)


def test_a_text_dropped_whole_maps_to_its_end() -> None:
    out = SpokenBuilder("🎉")
    spoken = out.build()
    assert spoken.text == ""
    assert spoken.to_original(0) == 1
    assert Spoken.verbatim("").to_original(0) == 0


def test_rewrite_composes_with_the_map_so_far() -> None:
    spoken = built()
    text = spoken.text
    # "Pay" → "Give", and "now" → "right now".
    again = spoken.rewrite([(0, 3, "Give"), (text.index("now"), len(text), "right now")])
    assert again.text == "Give three dollars fifty right now"
    assert again.original_span(0, 4) == (0, 3)
    three = again.text.index("three")
    assert again.original_span(three, three + 5) == (6, 11)
    right = again.text.index("right")
    assert again.original_span(right, len(again.text)) == (14, 17)


def test_an_edit_inside_a_replacement_widens_to_all_of_it() -> None:
    spoken = built()
    dollars = spoken.text.index("dollars")
    again = spoken.rewrite([(dollars, dollars + 7, "bucks")])
    assert again.text == "Pay three bucks fifty now"
    assert again.original_span(again.text.index("bucks"), again.text.index("bucks") + 5) == (6, 11)
    assert again.original_span(0, 3) == (0, 3)


def test_two_edits_inside_one_replacement_become_one() -> None:
    spoken = built()
    three, fifty = spoken.text.index("three"), spoken.text.index("fifty")
    again = spoken.rewrite([(three, three + 5, "3"), (fifty, fifty + 5, "50")])
    assert again.text == "Pay 3 dollars 50 now"
    assert again.original_span(4, 5) == (6, 11)


def test_insertion_and_deletion() -> None:
    spoken = Spoken.verbatim("ab cd")
    again = spoken.rewrite([(2, 2, ","), (3, 5, "")])
    assert again.text == "ab, "
    assert again.to_original(2) == 2
    assert again.to_original(len(again.text)) == 5


def test_no_edits_returns_the_same_object() -> None:
    spoken = built()
    assert spoken.rewrite([]) is spoken
    assert spoken.rewrite([(2, 2, "")]) is spoken


@pytest.mark.parametrize("edits", [[(3, 2, "x")], [(0, 3, "a"), (2, 4, "b")], [(0, 99, "x")]])
def test_bad_edits_are_refused(edits: list[tuple[int, int, str]]) -> None:
    with pytest.raises(ValueError):
        Spoken.verbatim("abcdef").rewrite(edits)


@st.composite
def rewrites(draw: st.DrawFn) -> Spoken:
    """A text rewritten two or three times by random edits."""
    spoken = Spoken.verbatim(draw(st.text(alphabet="ab $.5*🎉\n", max_size=30)))
    for _ in range(draw(st.integers(1, 3))):
        n = len(spoken.text)
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
        edits = []
        for start, end in zip(cuts[::2], cuts[1::2], strict=False):
            edits.append((start, end, draw(st.text(alphabet="xy ", max_size=4))))
        spoken = spoken.rewrite(edits)
    return spoken


@given(rewrites())
def test_the_map_is_monotonic_and_inside_the_original(spoken: Spoken) -> None:
    positions = [spoken.to_original(i) for i in range(len(spoken.text) + 1)]
    assert positions == sorted(positions)
    assert all(0 <= p <= len(spoken.original) for p in positions)
    assert positions[-1] == len(spoken.original)
    for i in range(len(spoken.text)):
        for j in range(i + 1, min(len(spoken.text), i + 4) + 1):
            low, high = spoken.original_span(i, j)
            assert 0 <= low <= high <= len(spoken.original)


@given(rewrites())
def test_copied_pieces_hold_the_original_text(spoken: Spoken) -> None:
    assert spoken.starts[-1] == len(spoken.text)
    assert spoken.origins[-1] == len(spoken.original)
    for k, copied in enumerate(spoken.copied):
        if copied:
            piece = spoken.text[spoken.starts[k] : spoken.starts[k + 1]]
            assert piece == spoken.original[spoken.origins[k] : spoken.origins[k + 1]]
