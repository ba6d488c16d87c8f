"""Which rows a validation fit may train on, so that nothing held out is seen in another guise.

Holding out one ``file:task`` is not enough: the shared files overlap. ``llmrouter`` and
``routerbench_train`` both carry MBPP and ARC-Challenge, and 72 of RouterBench's 297 MBPP prompts
are in ``llmrouter`` word for word; training on them while RouterBench's MBPP is "held out" lifted
its leave-one-task-out APGR from 0.58 to 0.65 (hashing encoder). So a held-out task is held out of every file (the
same task under any file's spelling of its name, ``task_name``), and any other row whose prompt is
a held-out prompt verbatim (whitespace normalised, ``prompt_key``) is dropped from training too.

Which ``file:task`` pairs of the shared data are one task (every other task name occurs in one
file only, and no other prompt is shared across files):

- ``llmrouter:arc_challenge`` and ``routerbench_train:arc_challenge``: ARC-Challenge in both;
- ``llmrouter:mbpp`` and ``routerbench_train:mbpp``: MBPP in both (72 prompts verbatim);
- ``llmrouter:gsm8k`` and ``llmrouter:agentverse-mgsm``: MGSM's English questions are GSM8K's.

Not one task: ``llmrouter:mmlu`` and ``mmlu_pro`` (MMLU-Pro leaves out MMLU's own questions),
``llmrouter:math`` and ``mmlu-pro/math``, ``llmrouter:human_eval`` and ``mbpp``, ``arena_chat:chat``
and AlpacaEval's ``chat/*`` sets (different prompt sets of one kind, the case leave-one-task-out
is meant to measure).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from routesvc.outcomes import OutcomeRecord

# Spellings of one benchmark, after ``task_name``'s lower-casing and '-'/' ' -> '_'.
ALIASES = {
    "arc": "arc_challenge",
    "arc_c": "arc_challenge",
    "ai2_arc": "arc_challenge",
    "humaneval": "human_eval",
    "gsm": "gsm8k",
    "mgsm": "gsm8k",
    "agentverse_mgsm": "gsm8k",
}


def task_name(task: str) -> str:
    """The benchmark a task name stands for in any file: ``ARC-Challenge`` and ``arc_challenge``
    are one task, ``agentverse-mgsm`` is GSM8K."""
    name = task.strip().lower().replace("-", "_").replace(" ", "_")
    return ALIASES.get(name, name)


def prompt_key(prompt: str) -> str:
    """A prompt with its whitespace normalised: two rows with one key are the same prompt."""
    return " ".join(prompt.split())


@dataclass(frozen=True)
class Split:
    """The rows a fit may train on beside held-out rows, and what was kept out to keep it blind."""

    train: list[int]
    same_task: int
    """Rows of the held-out task in other files (``task_name``), kept out of training."""
    duplicates: int
    """Other rows whose prompt is a held-out prompt verbatim, kept out of training."""


def blind_training(records: Sequence[OutcomeRecord], held: Iterable[int], candidates: Iterable[int]) -> Split:
    """``candidates`` (held-out rows excluded) without any row whose prompt is a held-out prompt."""
    held = set(held)
    held_prompts = {prompt_key(records[i].prompt) for i in held}
    rows = [i for i in candidates if i not in held]
    train = [i for i in rows if prompt_key(records[i].prompt) not in held_prompts]
    return Split(train=train, same_task=0, duplicates=len(rows) - len(train))


def leave_out(records: Sequence[OutcomeRecord], held: Iterable[int], candidates: Iterable[int]) -> Split:
    """``candidates`` (held-out rows excluded) without the held-out rows' tasks (``task_name``, in
    any file) and without any copy of a held-out prompt."""
    held = set(held)
    names = {task_name(records[i].task) for i in held}
    rows = [i for i in candidates if i not in held]
    outside = [i for i in rows if task_name(records[i].task) not in names]
    split = blind_training(records, held, outside)
    return Split(train=split.train, same_task=len(rows) - len(outside), duplicates=split.duplicates)


def leave_task_out(records: Sequence[OutcomeRecord], task: str) -> Split:
    """Training rows when ``task`` (``file:task``) is held out: not the task in any file, and no
    copy of one of its prompts under another task."""
    held = [i for i, r in enumerate(records) if f"{r.source}:{r.task}" == task]
    return leave_out(records, held, range(len(records)))
