"""The validation splits of bench/ (bench/_heldout.py): nothing held out is trained on in another guise."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from bench._heldout import blind_training, leave_out, leave_task_out, task_name
from routesvc.outcomes import OutcomeRecord, read_outcomes
from tests.routing_data import STRONG, WEAK, write_jsonl


def row(source: str, task: str, n: int, prompt: str) -> OutcomeRecord:
    outcomes = MappingProxyType({STRONG: 1.0, WEAK: float(n % 2)})
    return OutcomeRecord(f"{source}-{task}-{n}", prompt, task, outcomes, MappingProxyType({}), source)


def shared_files(folder: Path) -> list[OutcomeRecord]:
    """Two files that overlap as the shared data does: ARC in both (spelt differently), and one
    of the first file's ARC prompts copied, with other spacing, under another task of the second."""
    folder.mkdir()
    write_jsonl(
        folder / "first.jsonl",
        [
            row("first", "ARC-Challenge", 0, "Which gas do plants take in?"),
            row("first", "ARC-Challenge", 1, "What makes a shadow longer?"),
            row("first", "winogrande", 2, "The trophy did not fit in the case because it was too big."),
        ],
    )
    write_jsonl(
        folder / "second.jsonl",
        [
            row("second", "arc_challenge", 0, "Which planet is closest to the sun?"),
            row("second", "mbpp", 1, "Which  gas do plants\ntake in? "),
            row("second", "mbpp", 2, "Write a function that reverses a list."),
            row("second", "gsm8k", 3, "Tom has 3 apples and buys 4 more. How many has he?"),
        ],
    )
    return read_outcomes(folder)


def keys(records: list[OutcomeRecord], rows: list[int]) -> set[str]:
    return {f"{records[i].source}:{records[i].task}:{records[i].id}" for i in rows}


class TestLeaveTaskOut:
    def test_the_held_out_task_is_held_out_of_every_file_and_its_prompts_under_any_task(self, tmp_path: Path) -> None:
        """Holding out first:ARC-Challenge keeps second:arc_challenge (the same task) and second's
        verbatim copy of an ARC prompt (under mbpp, other whitespace) out of training, and counts
        each; every other row stays."""
        records = shared_files(tmp_path / "data")
        split = leave_task_out(records, "first:ARC-Challenge")
        expected = {
            "first:winogrande:first-winogrande-2",
            "second:mbpp:second-mbpp-2",
            "second:gsm8k:second-gsm8k-3",
        }
        assert expected == keys(records, split.train)
        assert (split.same_task, split.duplicates) == (1, 1)

    def test_a_whole_file_held_out_takes_its_tasks_and_prompts_out_of_the_other_files(self, tmp_path: Path) -> None:
        """bench/chat_categories holds out a file: its tasks in other files and copies of its
        prompts are not trained on either."""
        records = shared_files(tmp_path / "data")
        first = [i for i, r in enumerate(records) if r.source == "first"]
        second = [i for i, r in enumerate(records) if r.source == "second"]
        split = leave_out(records, first, second)
        assert {"second:mbpp:second-mbpp-2", "second:gsm8k:second-gsm8k-3"} == keys(records, split.train)
        assert (split.same_task, split.duplicates) == (1, 1)


class TestBlindTraining:
    def test_held_out_rows_have_no_verbatim_copy_in_training(self, tmp_path: Path) -> None:
        """bench/rowfold holds out rows of tasks the router has seen: the tasks stay in training,
        copies of the held-out prompts in other files do not."""
        records = shared_files(tmp_path / "data")
        held = [i for i, r in enumerate(records) if r.source == "first"]
        split = blind_training(records, held, range(len(records)))
        expected = {
            "second:arc_challenge:second-arc_challenge-0",
            "second:mbpp:second-mbpp-2",
            "second:gsm8k:second-gsm8k-3",
        }
        assert expected == keys(records, split.train)
        assert split.duplicates == 1


class TestTaskName:
    def test_spellings_of_one_benchmark_are_one_task(self) -> None:
        """Case, '-' and ' ' do not matter, known aliases map to one name, and different
        benchmarks of one kind stay apart."""
        assert {"arc_challenge"} == {task_name(t) for t in ("arc_challenge", "ARC-Challenge", "ARC", "arc-c")}
        assert task_name("agentverse-mgsm") == "gsm8k"
        assert task_name("HumanEval") == "human_eval"
        assert len({task_name(t) for t in ("mmlu", "mmlu-pro/math", "math", "mbpp", "human_eval", "chat")}) == 6
