"""``Memo``: bounded, least recently used first out, keyed by digests, never by the text."""

from __future__ import annotations

import sys
import threading

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

    def test_two_threads_may_use_one_memo(self) -> None:
        """The WordLlama encoders of a process share one memo, and a reload builds its policy
        (encoding a text to check the router) in a worker thread while Routes encode on the
        event loop: a thread evicting the entry another thread had just found between its
        lookup and its move to most recent raised KeyError there (an INTERNAL mid-Route). With
        the interpreter switching threads as often as it can, two threads getting and putting
        over a memo of two entries raise nothing and find what they put."""
        memo: Memo[str] = Memo(2)
        keys = [text_key(str(i)) for i in range(3)]
        errors: list[BaseException] = []
        wrong: list[str | None] = []
        start = threading.Barrier(2)

        def churn() -> None:
            start.wait()
            try:
                for i in range(20_000):
                    key = keys[i % 3]
                    memo.put(key, key.hex())
                    value = memo.get(key)
                    if value not in (None, key.hex()):
                        wrong.append(value)
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=churn) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert errors == []
        assert wrong == []
        assert len(memo) == 2
