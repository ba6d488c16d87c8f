"""Cheap lexical features of a prompt: size, numbers, code, exam shape and task cues.

They complement embeddings: static embeddings average words away, while the difficulty and
kind of a request often show in its shape (how many numbers, a code fence, lettered options).
Every feature is a pure function of the text, so it transfers to prompts of any data set.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from routesvc.memo import Memo


def _cues(starts: str, pattern: str, flags: int = 0) -> re.Pattern[str]:
    """``pattern``, led by a lookahead on the characters a match can start with (``starts``, a
    character class): it finds exactly the same matches, since every match starts with one of
    them, but the engine skips all other positions at once instead of trying each alternative
    there, 2-4x faster on long prompts. ``tests/test_features.py`` checks each ``starts`` against
    its pattern."""
    return re.compile(f"(?=[{starts}])(?:{pattern})", flags)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_CODE = _cues(
    "`#={;abcdfghijprst",
    r"```|\bdef |\bclass \w+|\breturn\b|\bimport \w+|#include|\bfunction\b|console\.log|\bSELECT\b|=>|\{\s*$|;\s*$"
    r"|\b(?:python|javascript|typescript|java|c\+\+|golang|rust|sql|bash|html|css|regex|api|json|dockerfile)\b"
    r"|\b(?:code|script|program|compile|bug|debug|implement|refactor|snippet)\w*",
    re.IGNORECASE | re.MULTILINE,
)
_MATH = _cues(
    r"\d$\\acdehiprsx",
    r"\d\s*[-+*/^=×÷<>]\s*\d|\$\d|\d\s*%|\\frac|\\sqrt|\bx\^|\b(?:solve|calculate|compute|equation|integral|derivative"
    r"|probability|how many|how much|how long|how far|sum of|product of|remainder|percent|prove|ratio|average)\b",
    re.IGNORECASE,
)
_CREATIVE = _cues(
    "cdfhilnprstv",
    r"\b(?:story|stories|poem|poetry|haiku|limerick|sonnet|lyrics|song|verse|fiction|novel|screenplay|script for a"
    r"|fable|fairy tale|dialogue|toast|rap|creative|imagine|diary entry|narrative|plot twist)\b",
    re.IGNORECASE,
)
_SUMMARY = _cues("bcgkst", r"\b(?:summar\w*|tl;?dr|key takeaways|condense|shorten|boil .* down|gist)\b", re.IGNORECASE)
_EXTRACT = _cues(
    "efilpr",
    r"\b(?:extract|pull out|find all|list (?:all|every)|parse|identify the|return (?:the|them) as)\b",
    re.IGNORECASE,
)
_GREETING = re.compile(r"^\s*(?:hi|hello|hey|thanks|thank you|good (?:morning|evening)|how are you)\b", re.IGNORECASE)
_OPTIONS = re.compile(r"(?m)^\s*\(?[A-J][).:]\s")
_TURNS = re.compile(r"(?im)^(?:user|assistant|human|ai)\s*:")
_REASONING_WORDS = _cues(
    "acdejorsw",
    r"\b(?:why|explain|compare|analy[sz]e|evaluate|step[- ]by[- ]step|reason|justify|derive|design|optimi[sz]e)\b",
    re.IGNORECASE,
)
# On ASCII text, matching case-insensitively is matching the lower-cased text with the lower-cased
# pattern, which the engine does another 1.5x faster (no case folding at each character).
_ON_ASCII = {
    cue: re.compile(cue.pattern.lower(), cue.flags & ~re.IGNORECASE)
    for cue in (_CODE, _MATH, _CREATIVE, _SUMMARY, _EXTRACT, _REASONING_WORDS)
}

# The learned stages read at most this much of a prompt: its start (where instructions usually
# are) and its end (where "summarise the above" goes). Every prompt of the shared data is shorter,
# so fitted routers and measured accuracies are unchanged; a megabyte-long prompt costs ~5 ms to
# classify instead of 1.7 s of the event loop.
READ_CHARS = 8_000
_HEAD_CHARS = 5_000


def bounded(text: str) -> str:
    """The part of ``text`` the classifier and the fitted router read (``READ_CHARS`` at most)."""
    if len(text) <= READ_CHARS:
        return text
    return text[:_HEAD_CHARS] + "\n" + text[len(text) - (READ_CHARS - _HEAD_CHARS - 1) :]


FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_numbers",
    "log_lines",
    "log_code_cues",
    "log_math_cues",
    "log_creative_cues",
    "log_summary_cues",
    "log_extract_cues",
    "greeting",
    "options",
    "log_turns",
    "log_reasoning_words",
    "log_questions",
    "mean_word_length",
)


# Fitting and LOTO evaluation meet the same prompts many times, and a request's message is read
# by the task classifier and then by a fitted router (the embedding stage, or its kind prior's own
# labelling): each text's features are computed once. Short texts are remembered by the text (the
# fastest key); longer ones, where the features cost most (~0.6 ms for 3.6K characters), by digest,
# so a long-running server holds no long prompt in memory.
_CACHE_MAX_CHARS = 2_048
_LONG_TEXTS: Memo[tuple[float, ...]] = Memo(256)


@functools.lru_cache(maxsize=4_096)
def _cached_features(text: str) -> tuple[float, ...]:
    return tuple(lexical_features(text))


def _features(text: str) -> tuple[float, ...]:
    if len(text) <= _CACHE_MAX_CHARS:
        return _cached_features(text)
    return _LONG_TEXTS.compute(text, lambda long: tuple(lexical_features(long)))


def lexical_features(text: str) -> list[float]:
    """The ``FEATURE_NAMES`` values of one prompt."""
    words = text.split()
    mean_word = sum(len(word) for word in words) / len(words) if words else 0.0
    ascii_text = text.isascii()
    lowered = text.lower() if ascii_text else text

    def cues(pattern: re.Pattern[str]) -> float:
        if ascii_text:
            return math.log1p(len(_ON_ASCII[pattern].findall(lowered)))
        return math.log1p(len(pattern.findall(text)))

    return [
        math.log1p(len(text)),
        math.log1p(len(words)),
        math.log1p(len(_NUMBER.findall(text))),
        math.log1p(text.count("\n")),
        cues(_CODE),
        cues(_MATH),
        cues(_CREATIVE),
        cues(_SUMMARY),
        cues(_EXTRACT),
        1.0 if _GREETING.search(text) else 0.0,
        1.0 if len(_OPTIONS.findall(text)) >= 3 else 0.0,
        math.log1p(len(_TURNS.findall(text))),
        cues(_REASONING_WORDS),
        math.log1p(text.count("?")),
        min(mean_word, 20.0) / 10.0,
    ]


def lexical_matrix(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """``lexical_features`` of each text as rows of a float32 matrix."""
    if not texts:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    return np.array([_features(text) for text in texts], dtype=np.float32)


_WORD = re.compile(r"\w+")
_PAIR_MIX = np.uint64(1_000_003)
_LOW_32 = np.uint64(0xFFFF_FFFF)


def word_hashes(texts: Sequence[str], dim: int = 1024) -> npt.NDArray[np.float32]:
    """Signed counts of each text's lower-cased words and word pairs hashed into ``dim`` slots
    (CRC-32 of a word; a pair mixes its two words' hashes), each row L2-normalised: which words a
    prompt uses, for classifiers that an averaged embedding would blur ("poem", "regex", "prove").
    Stable across processes."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        if not words:
            continue
        singles = np.array([zlib.crc32(word.encode()) for word in words], dtype=np.uint64)
        pairs = ((singles[:-1] * _PAIR_MIX) ^ singles[1:]) & _LOW_32
        hashes = np.concatenate([singles, pairs])
        signs = np.where((hashes >> np.uint64(31)) & np.uint64(1), 1.0, -1.0)
        counts = np.bincount((hashes % np.uint64(dim)).astype(np.intp), weights=signs, minlength=dim)
        norm = math.sqrt(float(counts @ counts))
        if norm > 0:
            out[row] = counts / norm
    return out
