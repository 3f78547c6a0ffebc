"""Tests for the pronunciation lexicon."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxrelay.service.lexicon import Lexicon, LexiconError
from voxrelay.service.normalize import TextNormalizer
from voxrelay.service.spoken import Spoken

LEXICON = """\
# Names our users care about.
nginx\tengine x

SQL\tsequel
New York\tthe big apple
C++\tC plus plus
"""


def test_load_reads_entries_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "lexicon.tsv"
    path.write_text(LEXICON, encoding="utf-8")
    assert len(Lexicon.load(path)) == 4


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("Run nginx now.", "Run engine x now."),
        ("NGINX and Nginx.", "engine x and engine x."),  # case-insensitive
        ("Use SQL, not NoSQL.", "Use sequel, not NoSQL."),  # whole words only
        ("sql_server stays.", "sql_server stays."),
        ("I love New York!", "I love the big apple!"),  # the longest entry wins
        ("Write C++ daily.", "Write C plus plus daily."),
        ("Nothing here.", "Nothing here."),
    ],
)
def test_whole_words_are_replaced_case_insensitively(text: str, spoken: str) -> None:
    lexicon = Lexicon.parse(LEXICON)
    assert lexicon.apply(Spoken.verbatim(text)).text == spoken


def test_it_applies_after_normalization_and_keeps_the_map() -> None:
    lexicon = Lexicon.parse("dollars\tbucks\nnginx\tengine x\n")
    original = "**nginx** costs $3.50"
    spoken = lexicon.apply(TextNormalizer().normalize(original))
    assert spoken.text == "engine x costs three bucks fifty"
    low, high = spoken.original_span(0, len("engine x"))
    assert original[low:high] == "nginx"
    bucks = spoken.text.index("bucks")
    low, high = spoken.original_span(bucks, bucks + 5)
    assert original[low:high] == "$3.50"


def test_an_empty_lexicon_changes_nothing() -> None:
    spoken = Spoken.verbatim("anything")
    assert Lexicon.parse("# nothing yet\n\n").apply(spoken) is spoken


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("nginx engine x\n", 1, "no tab"),
        ("# ok\nnginx\tengine x\n\nsql\n", 4, "no tab"),
        ("nginx\t\n", 1, "both the word and its spoken form"),
        ("\tengine x\n", 1, "both the word and its spoken form"),
        ("a\tb\tc\n", 1, "more than one tab"),
        ("...\tdots\n", 1, "not a word"),
        ("nginx\tengine x\nNGINX\tother\n", 2, "already defined on line 1"),
    ],
)
def test_a_bad_line_names_the_file_and_line(
    tmp_path: Path, content: str, line: int, reason: str
) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LexiconError) as caught:
        Lexicon.load(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert reason in str(caught.value)


def test_an_unreadable_file_is_a_lexicon_error(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match="cannot read"):
        Lexicon.load(tmp_path / "missing.tsv")
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LexiconError, match="cannot read"):
        Lexicon.load(binary)
