"""Lexical features: the cue patterns' lookaheads and the ASCII fast path change nothing but speed."""

from __future__ import annotations

import itertools
import math
import re
import string
import zlib
from re import _constants as sre  # type: ignore[attr-defined]  # the parser's node names
from re import _parser as sre_parse  # type: ignore[attr-defined]

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routesvc import features
from routesvc.outcomes import read_outcomes
from routesvc.strategies.classifier import read_examples
from tests.conftest import SHARED_DATA

_LED = [name for name in dir(features) if isinstance(getattr(features, name), re.Pattern)]
_LOOKAHEAD = re.compile(r"\(\?=\[(?P<starts>(?:\\.|[^\]])+)\]\)\(\?:(?P<inner>.*)\)", re.DOTALL)


def _split(pattern: re.Pattern[str]) -> tuple[str, re.Pattern[str]] | None:
    """(the lookahead's class, the pattern without it), or None for a pattern without one."""
    led = _LOOKAHEAD.fullmatch(pattern.pattern)
    if led is None:
        return None
    return led["starts"], re.compile(led["inner"], pattern.flags)


def _first_characters(items: list[tuple[object, object]]) -> set[str]:
    """Characters a match of the parsed ``items`` can start with (categories by examples)."""
    first: set[str] = set()
    for op, arg in items:
        if op is sre.AT:
            continue  # zero width: the next item decides
        if op is sre.LITERAL:
            return first | {chr(arg)}  # type: ignore[arg-type]
        if op is sre.IN:
            for kind, value in arg:  # type: ignore[attr-defined]
                if kind is sre.LITERAL:
                    first.add(chr(value))
                elif kind is sre.RANGE:
                    first.update(chr(c) for c in range(value[0], value[1] + 1))
                elif kind is sre.CATEGORY and value is sre.CATEGORY_DIGIT:
                    first.update("0123456789٣")
                else:
                    raise AssertionError(f"unhandled class item {kind} {value}")
            return first
        if op is sre.BRANCH:
            for branch in arg[1]:  # type: ignore[index]
                first |= _first_characters(list(branch))
            return first
        if op is sre.SUBPATTERN:
            return first | _first_characters(list(arg[-1]))  # type: ignore[index]
        raise AssertionError(f"unhandled leading item {op}")
    raise AssertionError("a cue pattern that can match the empty string")


def _led_patterns() -> list[str]:
    return [name for name in _LED if _split(getattr(features, name)) is not None]


def _prompts() -> list[str]:
    texts = [prompt for _, prompt in read_examples()]
    if SHARED_DATA.exists():
        for path in sorted(SHARED_DATA.glob("*.jsonl")):
            texts.extend(record.prompt for record in read_outcomes(path))
    return texts


class TestCuePatterns:
    def test_the_slow_patterns_are_led_by_a_lookahead(self) -> None:
        assert set(_led_patterns()) >= {"_CODE", "_MATH", "_CREATIVE", "_SUMMARY", "_EXTRACT", "_REASONING_WORDS"}

    @pytest.mark.parametrize("name", _led_patterns())
    def test_every_character_a_match_can_start_with_is_in_the_lookahead(self, name: str) -> None:
        split = _split(getattr(features, name))
        assert split is not None
        starts, plain = split
        lookahead = re.compile(f"[{starts}]", plain.flags)
        for char in _first_characters(list(sre_parse.parse(plain.pattern, plain.flags))):
            assert lookahead.match(char), f"{name}: a match can start with {char!r}"

    @pytest.mark.parametrize("name", _led_patterns())
    def test_same_matches_as_the_plain_pattern_on_every_shared_prompt(self, name: str) -> None:
        led = getattr(features, name)
        split = _split(led)
        assert split is not None
        texts = _prompts()
        assert len(texts) > 100
        assert [led.findall(text) for text in texts] == [split[1].findall(text) for text in texts]

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    "def ",
                    "class X",
                    "import os",
                    "SELECT",
                    "=>",
                    "{\n",
                    ";\n",
                    "Python",
                    "coding",
                    "ſolve",
                    "K",
                    "3 + 4",
                    "$5",
                    "7 %",
                    "\\frac",
                    "x^2",
                    "how many",
                    "Story",
                    "tl;dr",
                    "boil it down",
                    "pull out",
                    "why",
                    "step-by-step",
                    "analyse",
                    " ",
                    "\n",
                    "a",
                    "ü",
                    "İ",
                    "_",
                    ".",
                ]
            ).map(str)
            | st.text(alphabet=string.printable, max_size=4),
            max_size=40,
        ).map("".join)
    )
    def test_same_matches_as_the_plain_pattern_on_generated_text(self, text: str) -> None:
        for name in _led_patterns():
            led = getattr(features, name)
            split = _split(led)
            assert split is not None
            assert led.findall(text) == split[1].findall(text), name


def _reference_features(text: str) -> list[float]:
    """``lexical_features`` as first written: the plain case-insensitive patterns on the text."""

    def plain(pattern: re.Pattern[str]) -> re.Pattern[str]:
        split = _split(pattern)
        return pattern if split is None else split[1]

    words = text.split()
    mean_word = sum(len(word) for word in words) / len(words) if words else 0.0
    count = [
        math.log1p(len(plain(p).findall(text)))
        for p in (features._CODE, features._MATH, features._CREATIVE, features._SUMMARY, features._EXTRACT)
    ]
    return [
        math.log1p(len(text)),
        math.log1p(len(words)),
        math.log1p(len(features._NUMBER.findall(text))),
        math.log1p(text.count("\n")),
        *count,
        1.0 if features._GREETING.search(text) else 0.0,
        1.0 if len(features._OPTIONS.findall(text)) >= 3 else 0.0,
        math.log1p(len(features._TURNS.findall(text))),
        math.log1p(len(plain(features._REASONING_WORDS).findall(text))),
        math.log1p(text.count("?")),
        min(mean_word, 20.0) / 10.0,
    ]


class TestLexicalFeatures:
    def test_the_ascii_patterns_have_no_escape_whose_meaning_depends_on_case(self) -> None:
        for pattern in features._ON_ASCII.values():
            assert not re.search(r"\\[A-Z]", pattern.pattern), pattern.pattern
            assert not pattern.flags & re.IGNORECASE

    def test_equal_to_the_plain_patterns_on_every_shared_prompt(self) -> None:
        texts = _prompts()
        assert any(not text.isascii() for text in texts)
        assert [features.lexical_features(text) for text in texts] == [_reference_features(text) for text in texts]

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(["Write a PYTHON Script", "SELECT *", "Solve", "HOW MANY", "Poem", "TL;DR", "Why", "ſ"])
            | st.text(alphabet=string.printable + "İıſK×", max_size=4),
            max_size=30,
        ).map("".join)
    )
    def test_equal_to_the_plain_patterns_on_generated_text(self, text: str) -> None:
        assert features.lexical_features(text) == _reference_features(text)


class TestRemembered:
    def test_a_long_texts_features_are_computed_once_and_filed_by_digest(self) -> None:
        """The classifier and a fitted router read the same message: a text over the short-text
        cache's limit is computed once, remembered in a ``Memo`` (by digest: no prompt text kept),
        and every later read gives the same row."""
        long = "Explain, step by step, how 17 x 23 = 391 is checked. " * 60
        assert len(long) > features._CACHE_MAX_CHARS
        expected = np.array([features.lexical_features(long)], dtype=np.float32)
        remembered = len(features._LONG_TEXTS)
        first = features.lexical_matrix([long])
        assert len(features._LONG_TEXTS) == remembered + 1
        again = features.lexical_matrix([long])
        assert len(features._LONG_TEXTS) == remembered + 1
        np.testing.assert_array_equal(first, expected)
        np.testing.assert_array_equal(again, expected)


class TestBounded:
    def test_a_prompt_up_to_the_limit_is_read_whole(self) -> None:
        text = "x" * features.READ_CHARS
        assert features.bounded(text) is text

    def test_a_longer_prompt_is_read_at_its_start_and_end(self) -> None:
        text = "START " + "middle " * 200_000 + " END"
        window = features.bounded(text)
        assert len(window) == features.READ_CHARS
        assert window.startswith("START middle")
        assert window.endswith("middle  END")
        assert features.bounded(window) == window


class TestWordHashes:
    def test_each_word_and_word_pair_lands_in_its_crc32_slot_with_its_sign(self) -> None:
        """ "Write a Poem" counts write, a, poem and the pairs (write, a), (a, poem), lower-cased:
        five signed unit counts in their CRC-32 slots (so the same in every process), then
        scaled to length 1."""
        dim = 1024
        row = features.word_hashes(["Write a Poem"], dim)[0]
        singles = [zlib.crc32(word.encode()) for word in ("write", "a", "poem")]
        pairs = [((a * 1_000_003) ^ b) & 0xFFFF_FFFF for a, b in itertools.pairwise(singles)]
        expected = np.zeros(dim)
        for value in singles + pairs:
            expected[value % dim] += 1.0 if (value >> 31) & 1 else -1.0
        assert np.allclose(row, expected / np.linalg.norm(expected))

    def test_word_order_changes_the_pairs_and_blank_text_is_all_zero(self) -> None:
        """Same words in another order differ (the pairs); text without words gives a zero row."""
        rows = features.word_hashes(["prove this lemma", "lemma this prove", "   ?! "])
        assert not np.allclose(rows[0], rows[1])
        assert np.isclose(np.linalg.norm(rows[0]), 1.0)
        assert not rows[2].any()
