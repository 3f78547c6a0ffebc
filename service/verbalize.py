"""Write numbers, money, dates, times, units and abbreviations as English words.

:func:`verbalize` returns edits (see :meth:`.spoken.Spoken.rewrite`) that turn
"$3.50 on Dec 6 at 3:30 pm" into "three dollars fifty on December sixth at three
thirty p m". One scanner finds every kind of expression in a single pass (the
alternatives of one regular expression, the longest kinds first); each kind has a
small function that says it, and all of them say numbers through the same few
functions built on num2words. A rule emits one edit per word of the original where
it can ("Dec" → "December", "6" → "sixth"), so word timings stay per word.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal

from num2words import num2words

from .spoken import Edit

__all__ = ["say_cardinal", "say_digits", "say_ordinal", "say_year", "verbalize"]

_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MONTHS = (
    *("January", "February", "March", "April", "May", "June", "July"),
    *("August", "September", "October", "November", "December"),
)
_MONTH_NUMBER = {name[:3].lower(): i for i, name in enumerate(_MONTHS, 1)} | {"sept": 9}

# Currency symbol: (one, many, one of the hundredth, many of them).
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
    "₹": ("rupee", "rupees", "paisa", "paise"),
}
_SCALES = {
    "k": "thousand",
    "m": "million",
    "mn": "million",
    "b": "billion",
    "bn": "billion",
    "thousand": "thousand",
    "million": "million",
    "billion": "billion",
    "trillion": "trillion",
}
# Unit as written: (singular, plural). Matched case-sensitively ("mB" is no unit).
_UNITS = {
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "°C": ("degree Celsius", "degrees Celsius"),
    "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"),
    "km": ("kilometer", "kilometers"),
    "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"),
    "m": ("meter", "meters"),
    "mi": ("mile", "miles"),
    "ft": ("foot", "feet"),
    "kg": ("kilogram", "kilograms"),
    "mg": ("milligram", "milligrams"),
    "g": ("gram", "grams"),
    "lb": ("pound", "pounds"),
    "lbs": ("pound", "pounds"),
    "oz": ("ounce", "ounces"),
    "ml": ("milliliter", "milliliters"),
    "mL": ("milliliter", "milliliters"),
    "L": ("liter", "liters"),
    "mph": ("mile per hour", "miles per hour"),
    "kph": ("kilometer per hour", "kilometers per hour"),
    "KB": ("kilobyte", "kilobytes"),
    "kB": ("kilobyte", "kilobytes"),
    "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"),
    "TB": ("terabyte", "terabytes"),
    "Mbps": ("megabit per second", "megabits per second"),
    "Gbps": ("gigabit per second", "gigabits per second"),
    "Hz": ("hertz", "hertz"),
    "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"),
    "GHz": ("gigahertz", "gigahertz"),
    "ms": ("millisecond", "milliseconds"),
    "sec": ("second", "seconds"),
    "min": ("minute", "minutes"),
    "hr": ("hour", "hours"),
    "hrs": ("hours", "hours"),
    "kW": ("kilowatt", "kilowatts"),
    "kWh": ("kilowatt hour", "kilowatt hours"),
    "W": ("watt", "watts"),
    "V": ("volt", "volts"),
}
# Abbreviations, lower case, as written with their dots.
_ABBREVIATIONS = {
    "e.g.": "for example",
    "i.e.": "that is",
    "etc.": "et cetera",
    "vs.": "versus",
    "vs": "versus",
    "dr.": "Doctor",
    "mr.": "Mister",
    "mrs.": "Missus",
    "prof.": "Professor",
    "st.": "Saint",
    "jr.": "Junior",
    "sr.": "Senior",
    "approx.": "approximately",
    "no.": "number",
    "&": "and",
    "#": "number ",
}
# Titles that are street names when no name follows: "Dr. Lee" but "Elm Dr.".
_STREETS = {"dr.": "Drive", "st.": "Street"}
# Abbreviations that may end a sentence, their dot doubling as its stop.
_SENTENCE_FINAL = frozenset({"etc.", "approx.", "vs.", "e.g.", "i.e."})
# A word before a four-digit number that makes it a year: "in 1999", "since 2020".
_YEAR_CUES = frozenset(
    {"in", "since", "from", "until", "till", "by", "before", "after", "during", "of", "year"}
    | {"circa", "around", "early", "late", "mid", "the", "to", "and", "or"}
    | {name.lower() for name in _MONTHS}
)

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_UNIT = "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))
_ABBREVIATION = (
    r"(?<!\w)(?i:e\.g\.|i\.e\.|etc\.|vs\.?|dr\.|mr\.|mrs\.|prof\.|st\.|jr\.|sr\.|approx\.)"
    r"|(?i:no\.)(?=\s?\d)|(?<=\s)&(?=\s)|#(?=\d)"
)
_AMPM = r"(?P<{}>[AaPp])(?:\.[Mm]\.|[Mm])(?!\w)"

# Alternatives in priority order: at one position, the first that matches wins.
_KINDS: dict[str, str] = {
    "iso_date": (
        r"(?<![\w.-])(?P<iy>\d{4})-(?P<im>0[1-9]|1[0-2])-(?P<id>0[1-9]|[12]\d|3[01])(?![\w-])"
    ),
    "slash_date": r"(?<![\w/])(?P<sa>\d{1,2})/(?P<sb>\d{1,2})/(?P<sy>\d{4})(?![\w/])",
    "phone": (
        r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])"
        r"|(?<![\w.-])\d{3}-\d{4}(?![\w-])|(?<![\w+])\+\d{7,15}(?!\w)"
        r"|(?<![\w+])\+\d{1,3}(?:[ .-]\d{2,4}){2,5}(?![\w-])"
    ),
    "clock": r"(?<![\w:.])(?P<ch>[01]?\d|2[0-4]):(?P<cm>[0-5]\d)(?:\s?"
    + _AMPM.format("cap")
    + r")?(?![\w:])",
    "hour": r"(?<![\w:.])(?P<hh>1[0-2]|0?[1-9])\s?" + _AMPM.format("hap"),
    "month_day": (
        r"(?<!\w)(?P<mon>"
        + _MONTH
        + r"\.?)\s(?P<mdw>(?P<md>[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?)(?!\w)"
        r"(?:,?\s(?P<my>\d{4})(?!\w))?"
    ),
    "day_month": (
        r"(?<!\w)(?P<ddw>(?P<dd>[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?)\s(?:of\s)?(?P<dmon>"
        + _MONTH
        + r")(?!\w)(?:,?\s(?P<dy>\d{4})(?!\w))?"
    ),
    "money": (
        r"(?P<cur>[$€£¥₹])\s?(?P<mnum>" + _NUMBER + r")"
        r"(?:\s?(?P<mscale>[kKmMbB]n?|thousand|million|billion|trillion)(?!\w))?"
    ),
    "percent": r"(?<![\w.])(?P<pneg>-)?(?P<pnum>" + _NUMBER + r")\s?%",
    "ordinal": r"(?<![\w.])(?P<onum>\d+)(?:st|nd|rd|th)(?!\w)",
    "unit": r"(?<![\w.])(?P<unum>" + _NUMBER + r")\s?(?P<uname>" + _UNIT + r")(?![\w/])",
    "scaled": r"(?<![\w.])(?P<snum>" + _NUMBER + r")(?P<scale>[kK]|M|[bB]n|B)(?!\w)",
    "fraction": r"(?<![\w/.])(?P<fn>\d)/(?P<fd>\d{1,2})(?![\w/]|\.\d)",
    "range": r"(?<![\w.-])(?P<ra>\d{1,4})(?:–|-(?=\d))(?P<rb>\d{1,4})(?![\w-]|\.\d)",
    "number": r"(?<![\w.])(?P<neg>(?<!\S)[-−])?(?P<num>" + _NUMBER + r")(?P<decade>'?s)?(?![\w])",
    "abbreviation": _ABBREVIATION,
}
_STARTS_WITH_LETTER = ("month_day", "abbreviation")


def _scanner() -> re.Pattern[str]:
    # Most kinds start with a digit or a symbol; a lookahead on the first character
    # spares trying each of them at every position.
    symbols = "|".join(f"(?P<{k}>{p})" for k, p in _KINDS.items() if k not in _STARTS_WITH_LETTER)
    words = "|".join(f"(?P<{k}>{p})" for k, p in _KINDS.items() if k in _STARTS_WITH_LETTER)
    return re.compile(rf"(?=[\d$€£¥₹+(\-−])(?:{symbols})|(?<![\w.])(?=[A-Za-z&#])(?:{words})")


_SCANNER = _scanner()
# Text with none of these has nothing to verbalize (months only matter before a digit).
_CANDIDATE = re.compile(
    r"[\d$€£¥₹&]|(?<![\w.])(?i:e\.g|i\.e|etc|vs|dr|mrs?|prof|st|jr|sr|approx)(?:\.|(?<=vs)(?!\w))"
)


def say_cardinal(number: str) -> str:
    """Say a number written with optional thousands commas and decimals: "1,234.5"."""
    plain = number.replace(",", "")
    try:
        value = Decimal(plain)
        words: str = num2words(value if "." in plain else int(plain), lang="en")
    except (ArithmeticError, ValueError):  # InvalidOperation, OverflowError
        return say_digits(plain)
    return words.replace(",", "")


def say_digits(digits: str) -> str:
    """Say each digit of *digits* on its own; other characters are dropped."""
    return " ".join(_DIGITS[int(ch)] for ch in digits if ch.isdigit())


def say_ordinal(number: int) -> str:
    """Say *number* as an ordinal: 21 → "twenty-first"."""
    words: str = num2words(number, lang="en", to="ordinal")
    return words.replace(",", "")


def say_year(year: int) -> str:
    """Say *year* as years are read: 1999 → "nineteen ninety-nine"."""
    words: str = num2words(year, lang="en", to="year")
    return words


def verbalize(text: str) -> list[Edit]:
    """Return the edits that write the numbers and abbreviations of English *text* as words."""
    edits: list[Edit] = []
    if not _CANDIDATE.search(text):
        return edits
    for match in _SCANNER.finditer(text):
        kind = match.lastgroup
        if kind is not None:
            edits += _SAYERS[kind](match, text)
    return edits


# One function per kind: each returns edits for its match.

Sayer = Callable[["re.Match[str]", str], list[Edit]]


def _whole(match: re.Match[str], words: str) -> list[Edit]:
    return [(match.start(), match.end(), words)]


def _group(match: re.Match[str], name: str, words: str) -> Edit:
    return (match.start(name), match.end(name), words)


def _say_iso_date(match: re.Match[str], text: str) -> list[Edit]:
    year, month, day = int(match["iy"]), int(match["im"]), int(match["id"])
    return _whole(match, f"{_MONTHS[month - 1]} {say_ordinal(day)}, {say_year(year)}")


def _say_slash_date(match: re.Match[str], text: str) -> list[Edit]:
    # Month first, as in the US, unless the first number cannot be a month.
    first, second, year = int(match["sa"]), int(match["sb"]), int(match["sy"])
    month, day = (first, second) if first <= 12 else (second, first)
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return []
    return _whole(match, f"{_MONTHS[month - 1]} {say_ordinal(day)}, {say_year(year)}")


def _say_phone(match: re.Match[str], text: str) -> list[Edit]:
    groups = re.findall(r"\d+", match.group())
    words = ", ".join(say_digits(group) for group in groups)
    return _whole(match, ("plus " if match.group().startswith("+") else "") + words)


def _say_clock(match: re.Match[str], text: str) -> list[Edit]:
    hour, minute = int(match["ch"]), int(match["cm"])
    words = say_cardinal(str(hour))
    if minute == 0:
        words += " hundred" if hour > 12 and match["cap"] is None else ""
        words += " o'clock" if hour <= 12 and match["cap"] is None else ""
    elif minute < 10:
        words += " oh " + _DIGITS[minute]
    else:
        words += " " + say_cardinal(str(minute))
    if match["cap"] is None:
        return _whole(match, words)
    ampm = _say_ampm(match["cap"]) + _stop(match, text)
    if match.end("cm") == match.start("cap"):  # "3:30pm": one word in, one word out
        return _whole(match, f"{words} {ampm}")
    return [(match.start(), match.end("cm"), words), (match.start("cap"), match.end(), ampm)]


def _say_hour(match: re.Match[str], text: str) -> list[Edit]:
    if match.end("hh") == match.start("hap"):  # "9am": one word in, one word out
        words = f"{say_cardinal(str(int(match['hh'])))} {_say_ampm(match['hap'])}"
        return _whole(match, words + _stop(match, text))
    return [
        _group(match, "hh", say_cardinal(str(int(match["hh"])))),
        (match.start("hap"), match.end(), _say_ampm(match["hap"]) + _stop(match, text)),
    ]


def _say_ampm(letter: str) -> str:
    return "a m" if letter in "Aa" else "p m"


def _stop(match: re.Match[str], text: str) -> str:
    """Return "." when the dot that ends *match* ("p.m.", "etc.") also ends a sentence."""
    if not match.group().endswith("."):
        return ""
    rest = text[match.end() :].lstrip(" ")
    return "." if not rest or rest[0] == "\n" or rest[0].isupper() else ""


def _say_month_day(match: re.Match[str], text: str) -> list[Edit]:
    month = _MONTHS[_MONTH_NUMBER[match["mon"][:3].lower()] - 1]
    edits = [_group(match, "mon", month), _group(match, "mdw", say_ordinal(int(match["md"])))]
    if match["my"] is not None:
        edits.append(_group(match, "my", say_year(int(match["my"]))))
    return edits


def _say_day_month(match: re.Match[str], text: str) -> list[Edit]:
    month = _MONTHS[_MONTH_NUMBER[match["dmon"][:3].lower()] - 1]
    day = say_ordinal(int(match["dd"]))
    of = " of" if text[match.end("ddw") : match.start("dmon")].strip() != "of" else ""
    the = "" if text[: match.start()].lower().endswith("the ") else "the "
    edits = [_group(match, "ddw", f"{the}{day}{of}"), _group(match, "dmon", month)]
    if match["dy"] is not None:
        edits.append(_group(match, "dy", say_year(int(match["dy"]))))
    return edits


def _say_money(match: re.Match[str], text: str) -> list[Edit]:
    one, many, cent, cents = _CURRENCIES[match["cur"]]
    number = match["mnum"].replace(",", "")
    scale = match["mscale"]
    if scale is not None:
        return _whole(match, f"{say_cardinal(number)} {_SCALES[scale.lower()]} {many}")
    whole, _, fraction = number.partition(".")
    if fraction and (len(fraction) != 2 or not cent):
        return _whole(match, f"{say_cardinal(number)} {many}")
    units = int(whole)
    words = f"{say_cardinal(whole)} {one if units == 1 else many}"
    if fraction and int(fraction):
        if units == 0:
            words = f"{say_cardinal(str(int(fraction)))} {cent if int(fraction) == 1 else cents}"
        else:
            words += " " + say_cardinal(str(int(fraction)))
    return _whole(match, words)


def _say_percent(match: re.Match[str], text: str) -> list[Edit]:
    sign = "minus " if match["pneg"] else ""
    return _whole(match, f"{sign}{say_cardinal(match['pnum'])} percent")


def _say_ordinal(match: re.Match[str], text: str) -> list[Edit]:
    return _whole(match, say_ordinal(int(match["onum"])))


def _say_unit(match: re.Match[str], text: str) -> list[Edit]:
    singular, plural = _UNITS[match["uname"]]
    number = match["unum"]
    name = singular if number == "1" else plural
    if match.start("uname") == match.end("unum"):  # "5km": one word in, one word out
        return _whole(match, f"{say_cardinal(number)} {name}")
    return [_group(match, "unum", say_cardinal(number)), _group(match, "uname", name)]


def _say_scaled(match: re.Match[str], text: str) -> list[Edit]:
    return _whole(match, f"{say_cardinal(match['snum'])} {_SCALES[match['scale'].lower()]}")


def _say_fraction(match: re.Match[str], text: str) -> list[Edit]:
    numerator, denominator = int(match["fn"]), int(match["fd"])
    if not 0 < numerator < denominator <= 10:
        # Not a simple fraction ("24/7", "9/11"): say the numbers, keep the slash.
        return [
            _group(match, "fn", say_cardinal(match["fn"])),
            _group(match, "fd", say_cardinal(match["fd"])),
        ]
    if denominator == 2:
        name = "half" if numerator == 1 else "halves"
    elif denominator == 4:
        name = "quarter" if numerator == 1 else "quarters"
    else:
        name = say_ordinal(denominator) + ("" if numerator == 1 else "s")
    return _whole(match, f"{say_cardinal(match['fn'])} {name}")


def _say_range(match: re.Match[str], text: str) -> list[Edit]:
    first, second = match["ra"], match["rb"]
    if len(first) == 4 and len(second) == 4:
        return _whole(
            match, f"{_say_number(first, years=True)} to {_say_number(second, years=True)}"
        )
    return _whole(match, f"{say_cardinal(first)} to {say_cardinal(second)}")


def _say_number(number: str, *, years: bool) -> str:
    if years and len(number) == 4 and 1000 <= int(number) <= 2099:
        return say_year(int(number))
    if len(number) > 1 and number.startswith("0") and "." not in number:
        return say_digits(number)  # an identifier ("007"), not an amount
    if len(number) >= 10 and number.isdigit():
        return say_digits(number)
    return say_cardinal(number)


def _say_plain_number(match: re.Match[str], text: str) -> list[Edit]:
    number, decade = match["num"], match["decade"]
    sign = "minus " if match["neg"] else ""
    if decade is not None:
        if len(number) == 4 and number.isdigit():  # "the 1990s"
            words = say_year(int(number))
        else:
            words = say_cardinal(number)  # "the 80s"
        words = words[:-1] + "ies" if words.endswith("y") else words + "s"
        return _whole(match, sign + words)
    return _whole(match, sign + _say_number(number, years=_reads_as_year(match, text)))


def _reads_as_year(match: re.Match[str], text: str) -> bool:
    """Return whether a four-digit number reads as a year: "in 1999", "It was 1999."."""
    number = match["num"]
    if len(number) != 4 or not number.isdigit() or not 1000 <= int(number) <= 2099:
        return False
    before = text[max(0, match.start() - 12) : match.start()].split()
    if before and before[-1].lower().strip("(,") in _YEAR_CUES:
        return True
    after = text[match.end() : match.end() + 2]
    return not after.strip() or not after.lstrip()[0].isalnum()


def _say_abbreviation(match: re.Match[str], text: str) -> list[Edit]:
    written = match.group()
    words = _ABBREVIATIONS[written.lower()]
    if written.lower() in _STREETS:
        following = text[match.end() :].lstrip(" ")
        if not following[:1].isupper():
            words = _STREETS[written.lower()] + _stop(match, text)
    if written.lower() in _SENTENCE_FINAL:
        words += _stop(match, text)
    return _whole(match, words)


_SAYERS: dict[str, Sayer] = {
    "iso_date": _say_iso_date,
    "slash_date": _say_slash_date,
    "phone": _say_phone,
    "clock": _say_clock,
    "hour": _say_hour,
    "month_day": _say_month_day,
    "day_month": _say_day_month,
    "money": _say_money,
    "percent": _say_percent,
    "ordinal": _say_ordinal,
    "unit": _say_unit,
    "scaled": _say_scaled,
    "fraction": _say_fraction,
    "range": _say_range,
    "number": _say_plain_number,
    "abbreviation": _say_abbreviation,
}
