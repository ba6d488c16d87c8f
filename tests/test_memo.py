"""``Memo``: bounded, least recently used first out, keyed by digests, never by the text."""

from __future__ import annotations

from routesvc.memo import Memo, text_key


class TestMemo:
    def test_computes_once_per_text(self) -> None:
        made: list[str] = []
        memo: Memo[int] = Memo(8)

        def make(text: str) -> int:
            made.append(text)
            return len(text)

        assert [memo.compute(text, make) for text in ("ab", "abc", "ab", "abc")] == [2, 3, 2, 3]
        assert made == ["ab", "abc"]

    def test_drops_the_least_recently_used_past_its_size(self) -> None:
        memo: Memo[str] = Memo(2)
        memo.put(text_key("a"), "A")
        memo.put(text_key("b"), "B")
        assert memo.get(text_key("a")) == "A"  # a is now more recent than b
        memo.put(text_key("c"), "C")
        assert (memo.get(text_key("a")), memo.get(text_key("b")), memo.get(text_key("c"))) == ("A", None, "C")
        assert len(memo) == 2

    def test_size_zero_keeps_nothing(self) -> None:
        memo: Memo[str] = Memo(0)
        memo.put(text_key("a"), "A")
        assert (memo.get(text_key("a")), len(memo)) == (None, 0)

    def test_keys_are_fixed_size_digests_not_text(self) -> None:
        prompt = "a prompt that must not be held " * 100
        key = text_key(prompt)
        assert len(key) == 16
        assert text_key(prompt) == key != text_key(prompt + " ")
        assert len(text_key("lone surrogate \ud800")) == 16
