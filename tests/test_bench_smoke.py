"""A quick check that the benchmark harness still drives the service (no timings are asserted)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from bench import _load
from bench._harness import go_load_binary, percentile, summary_ms
from routesvc.outcomes import OutcomeRecord, read_outcomes
from routesvc.server import Server
from routesvc.testing import FakeProvider
from tests.conftest import REPO, SHARED_DATA, default_config, live_environ, settings_from
from tests.routing_data import STRONG, WEAK, records, write_jsonl


def _refuse(constant: str) -> object:
    raise ValueError(f"{constant} in JSON output")


class TestBenchHarness:
    def test_percentiles_interpolate(self) -> None:
        """p50 of 1..5 is 3, p99 interpolates between the two largest, summaries are in ms."""
        assert (percentile([5, 1, 3, 2, 4], 50), round(percentile([1, 2, 3, 4, 5], 99), 2)) == (3, 4.96)
        assert summary_ms([0.001, 0.003]) == {"p50_ms": 2.0, "p99_ms": 2.98, "mean_ms": 2.0}

    async def test_route_and_stream_loads_run_against_a_live_server(self, fake: FakeProvider) -> None:
        """The Route and Complete load generators complete calls without errors and count chunks."""
        async with Server(settings_from(default_config(), live_environ(fake)), port=0) as server:
            route = await asyncio.to_thread(_load.route_closed_loop, server.target, 2, 0.2, 20, 0.0)
            streams = await asyncio.to_thread(_load.streams, "grpc", server.target, 2, 0.2, 4, 1.0, 0.0)
            direct = await asyncio.to_thread(_load.streams, "openai", fake.openai_base_url, 2, 0.2, 4, 1.0, 0.0)
        assert (route["errors"], route["requests"] > 0) == (0, True)
        for result in (streams, direct):
            assert (result["errors"], result["streams"] > 0, result["stalls"]) == (0, True, 0)

    async def test_the_go_load_drives_route_closed_and_open_loop_over_several_connections(
        self, fake: FakeProvider
    ) -> None:
        """``bench/goload`` (built with the Go toolchain) completes calls without errors, in both
        loops, over several connections, and reports its own CPU per call."""
        binary = str(await asyncio.to_thread(go_load_binary))
        async with Server(settings_from(default_config(), live_environ(fake)), port=0) as server:
            closed = await asyncio.to_thread(
                _load.route_go, binary, server.target, concurrency=3, duration=0.3, connections=2, unique=True
            )
            opened = await asyncio.to_thread(_load.route_go, binary, server.target, duration=0.3, rate=50, warmup=0.1)
        assert (closed["errors"], closed["primed"], closed["requests"] > 0) == (0, 3, True)
        assert (opened["errors"], opened["requests"], opened["rate"]) == (0, 15, 50)
        assert closed["load_cpu_us_per_call"] > 0
        assert closed["p99_ms"] >= closed["p50_ms"] > 0

    def test_loop_lag_probes_the_serving_loop_under_load(self, tmp_path: Path) -> None:
        """The loop-lag probe samples the served loop's lag while the load runs, counts GCs, and
        reports the load's own figures beside them."""
        command = [sys.executable, "-m", "bench.loop_lag", "--scenario", "complete", "--concurrency", "2"]
        command += ["--load-processes", "1", "--duration", "1", "--output", "smoke_loop_lag"]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=180)
        written = REPO / "bench" / "results" / "smoke_loop_lag.json"
        try:
            result = json.loads(written.read_text(), parse_constant=_refuse)
        finally:
            written.unlink()
        assert result["loop_lag_ms"]["samples"] > 100
        assert result["loop_lag_ms"]["max"] >= result["loop_lag_ms"]["p99"] >= result["loop_lag_ms"]["p50"] >= 0
        assert (result["load"][0]["errors"], result["load"][0]["streams"] > 0) == (0, True)
        assert result["gc"]["collections"] == sum(result["gc"]["by_generation"].values())

    def test_a_short_soak_checks_every_chunk_and_samples_memory_over_time(self, tmp_path: Path) -> None:
        """Six seconds of soak with faults and cancels: streams checked, none bad, memory sampled
        repeatedly (the sampling loop once stopped after its first sample)."""
        out = tmp_path / "soak.json"
        command = [sys.executable, "-m", "bench.soak", "--minutes", "0.1", "--concurrency", "4"]
        command += ["--fault-rate", "0.3", "--cancel-rate", "0.2", "--sample-seconds", "1", "--out", str(out)]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=180)
        result = json.loads(out.read_text())
        assert (result["requests"] > 0, result["chunks_checked"] > 0) == (True, True)
        assert result["lost_duplicated_or_reordered_streams"] == 0, result["violations"]
        assert len(result["samples"]) >= 4
        assert all(sample["malloc_in_use_mib"] > 0 and sample["py_blocks"] > 0 for sample in result["samples"])

    def test_rowfold_scores_every_held_out_row_once_and_beats_random(self, tmp_path: Path) -> None:
        """Held-out rows of seen tasks: the synthetic hard prompts (numbers) are found in every fold."""
        data = tmp_path / "data"
        data.mkdir()
        write_jsonl(data / "synthetic.jsonl", records("synthetic"))
        write_jsonl(data / "other.jsonl", records("other", task="other"))
        out = tmp_path / "rowfold.json"
        command = [sys.executable, "-m", "bench.rowfold", "--data", str(data), "--file", "synthetic"]
        command += ["--strong", STRONG, "--weak", WEAK, "--folds", "2", "--encoder", "hashing-256", "--json", str(out)]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=180)
        pooled = json.loads(out.read_text())["pooled"]
        assert pooled["rows"] == len(records("synthetic"))
        assert pooled["apgr"] > pooled["random"] + 0.2
        assert pooled["gap"] == 0.5
        # Judged on another pair of the file's models (the weak one against the constant "other"):
        # the same fit, another gap (hard rows -0.5, easy rows +0.5).
        judged = [*command, "--judge-strong", WEAK, "--judge-weak", "other"]
        subprocess.run(judged, cwd=REPO, check=True, capture_output=True, timeout=180)
        assert json.loads(out.read_text())["pooled"]["gap"] == 0.0

    def test_difficulty_ceiling_ranks_by_the_other_models_and_sees_a_peaked_gap(self, tmp_path: Path) -> None:
        """Easy rows (all succeed), middling rows (only the strong model and a third model succeed)
        and impossible rows (all fail): ranking by the third models' failures puts the impossible
        rows first, so it falls short of the oracle, while the best function of difficulty (the
        middling decile scores highest) matches the oracle."""
        rows = []
        for i in range(90):
            kind = ("easy", "middling", "impossible")[i % 3]
            strong = 0.0 if kind == "impossible" else 1.0
            weak = 1.0 if kind == "easy" else 0.0
            third = {"easy": 1.0, "middling": 0.5, "impossible": 0.0}[kind]
            outcomes = MappingProxyType({STRONG: strong, WEAK: weak, "third": third, "fourth": third})
            rows.append(OutcomeRecord(f"r{i}", f"prompt {i}", "t", outcomes, MappingProxyType({}), "f"))
        data = tmp_path / "data"
        data.mkdir()
        write_jsonl(data / "f.jsonl", rows)
        out = tmp_path / "ceiling.json"
        command = [sys.executable, "-m", "bench.difficulty_ceiling", "--data", str(data)]
        command += ["--strong", STRONG, "--weak", WEAK, "--json", str(out)]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=180)
        result = json.loads(out.read_text())["f:t"]
        assert result["rows"] == 90
        assert result["any_function"] == pytest.approx(result["oracle"])
        assert result["difficulty"] < result["oracle"] - 0.1

    def test_chat_categories_compares_each_kinds_true_gap_with_the_router_held_out(self, tmp_path: Path) -> None:
        """Code requests need the strong model, poems do not: ranking by the classifier's label
        alone (code first) recovers the whole gap, and each kind's true gap is reported."""
        code = ["Write a Python function that {} a list of integers", "Implement in Rust a parser that {} JSON"]
        poems = ["Write a short poem about {} at dawn", "Compose a haiku about {} in the rain"]
        chat = []
        for i, word in enumerate(["sorts", "reverses", "merges", "filters", "dedupes", "rotates"] * 2):
            for kind, template in (("code", code[i % 2]), ("poem", poems[i % 2])):
                wins = {STRONG: 1.0, WEAK: 0.0 if kind == "code" else 1.0}
                chat.append(OutcomeRecord(f"{kind}{i}", template.format(word), "chat", MappingProxyType(wins), {}, "c"))
        data = tmp_path / "data"
        data.mkdir()
        write_jsonl(data / "chatfile.jsonl", chat)
        write_jsonl(data / "synthetic.jsonl", records("synthetic"))
        out = tmp_path / "categories.json"
        command = [sys.executable, "-m", "bench.chat_categories", "--data", str(data), "--file", "chatfile"]
        command += ["--strong", STRONG, "--weak", WEAK, "--json", str(out)]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=180)
        result = json.loads(out.read_text())
        code_row, poem_row = result["labels"]["code_generation"], result["labels"]["creative_writing"]
        assert (code_row["prompts"], code_row["gap"]) == (12, 1.0)
        assert (poem_row["prompts"], poem_row["gap"]) == (12, 0.0)
        assert result["apgr"]["labels alone"] == pytest.approx(result["apgr"]["oracle"])

    def test_classifier_bench_scores_hand_labelled_prompts_by_kind(self, tmp_path: Path) -> None:
        """--labels joins labels to prompts by source and id and reports each kind's accuracy."""
        data = tmp_path / "data"
        data.mkdir()
        prompts = {"c": "Write a Python function that reverses a linked list.", "p": "Write a poem about rain."}
        rows = [
            OutcomeRecord(key, text, "chat", MappingProxyType({STRONG: 1.0, WEAK: 0.5}), MappingProxyType({}), "chats")
            for key, text in prompts.items()
        ]
        write_jsonl(data / "chats.jsonl", rows)
        labels = tmp_path / "labels.jsonl"
        kinds = [
            {"source": "chats", "id": "c", "kind": "coding"},
            {"source": "chats", "id": "p", "kind": "creative_writing"},
        ]
        labels.write_text("".join(json.dumps(row) + "\n" for row in kinds), encoding="utf-8")
        command = [sys.executable, "bench/classifier.py", "--data", str(data), "--labels", str(labels)]
        output = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=180).stdout
        assert "coding: 100.0% of 1 as code_generation" in output
        assert "creative_writing: 100.0% of 1 as creative_writing" in output

    def test_streams_from_several_load_processes_merge_into_one_distribution(self) -> None:
        """--load-processes: the samples of load processes that ran side by side are pooled before
        percentiles are taken (not averaged percentiles), counts and rates summed, the longest
        garbage collection of any of them kept."""
        first = {
            "ttft_s": [0.010] * 99,
            "totals_s": [0.4] * 99,
            "gaps_s": [0.02],
            "streams": 99,
            "errors": 0,
            "streams_per_s": 9.9,
            "primed": 8,
            "load_gc_max_ms": 1.5,
        }
        second = {
            "ttft_s": [0.110],
            "totals_s": [0.5],
            "gaps_s": [0.3],
            "streams": 1,
            "errors": 2,
            "streams_per_s": 0.1,
            "primed": 8,
            "load_gc_max_ms": 40.0,
        }
        merged = _load.merge_streams([first, second], stall_seconds=0.25)
        assert (merged["streams"], merged["errors"], merged["streams_per_s"], merged["stalls"]) == (100, 2, 10.0, 1)
        assert (merged["ttft_p50_ms"], merged["primed"]) == (10.0, 16)
        assert merged["ttft_p99_ms"] == pytest.approx(11.0)
        assert merged["load_gc_max_ms"] == 40.0


class TestHandLabels:
    @pytest.mark.skipif(not SHARED_DATA.exists(), reason="the shared routing data is not beside the repository")
    def test_every_prompt_of_both_chat_files_has_exactly_one_known_kind(self) -> None:
        """bench/labels/real-prompt-kinds.jsonl: one line per row of arena_chat and alpaca_eval, no
        other ids, every kind one of the five, and no prompt text stored."""
        lines = (REPO / "bench" / "labels" / "real-prompt-kinds.jsonl").read_text(encoding="utf-8").splitlines()
        labels = [json.loads(line) for line in lines]
        expected = {
            (record.source, record.id)
            for name in ("arena_chat", "alpaca_eval")
            for record in read_outcomes(SHARED_DATA / f"{name}.jsonl")
        }
        assert sorted((row["source"], row["id"]) for row in labels) == sorted(expected)
        assert {row["kind"] for row in labels} <= {"coding", "math", "creative_writing", "other", "ambiguous"}
        assert all(set(row) == {"source", "id", "kind"} for row in labels)

    def test_loto_reports_apgr_cpt_and_aiq_for_held_out_tasks(self, tmp_path: Path) -> None:
        """Leave-one-task-out on two synthetic RouterBench-like tasks and another file: every group
        reports APGR and CPT, the pooled RouterBench rows AIQ from their costs, and the router
        (fitted without the held-out task) beats random there."""
        data = tmp_path / "data"
        data.mkdir()
        rows = []
        for task in ("alpha", "beta"):
            for i, record in enumerate(records("routerbench_train", task=task)):
                # Each task its own prompts: a verbatim copy of a held-out prompt is not trained on.
                prompt = f"{task}: {record.prompt}"
                rows.append(dataclasses.replace(record, id=f"{task}-{i}", task=task, prompt=prompt))
        write_jsonl(data / "routerbench_train.jsonl", rows)
        write_jsonl(data / "other.jsonl", records("other", task="other"))
        out = tmp_path / "loto.json"
        command = [sys.executable, "-m", "bench.loto", "--data", str(data), "--strong", STRONG, "--weak", WEAK]
        command += ["--encoders", "hashing", "--variants", "default", "--json", str(out)]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
        result = json.loads(out.read_text(), parse_constant=_refuse)  # strict JSON: no NaN
        pooled = result["routerbench_pooled_metrics"]
        key = "hashing / default"
        assert result["summary"]["routerbench pooled"][key] > 0.7
        assert pooled[key]["aiq"] > pooled["random"]["aiq"]
        assert pooled[key]["cpt50"] < pooled["random"]["cpt50"]
        assert set(result["task_cpt"]["routerbench_train:alpha"][key]) == {"cpt50", "cpt80"}
        held_out = {"routerbench_train:alpha", "routerbench_train:beta", "other:other-0", "other:other-1"}
        assert held_out == set(result["removed"])

    def test_loto_on_some_tasks_merged_into_a_full_run_recomputes_the_group_means_from_all_tasks(
        self, tmp_path: Path
    ) -> None:
        """--tasks fits and scores only the tasks named; --merge writes the earlier JSON with their
        values in place and every group mean recomputed over all its tasks (the earlier random
        baseline kept): a stale figure of the re-run task, and of its group, is replaced by what a
        full run gives. An unknown task is refused before any fit."""
        data = tmp_path / "data"
        data.mkdir()
        rows = []
        for task in ("alpha", "beta"):
            for i, record in enumerate(records("routerbench_train", task=task)):
                prompt = f"{task}: {record.prompt}"
                rows.append(dataclasses.replace(record, id=f"{task}-{i}", task=task, prompt=prompt))
        write_jsonl(data / "routerbench_train.jsonl", rows)
        write_jsonl(data / "other.jsonl", records("other", task="other"))
        command = [sys.executable, "-m", "bench.loto", "--data", str(data), "--strong", STRONG, "--weak", WEAK]
        command += ["--encoders", "hashing", "--variants", "default"]
        full, stale, merged = tmp_path / "full.json", tmp_path / "stale.json", tmp_path / "merged.json"
        subprocess.run([*command, "--json", str(full)], cwd=REPO, check=True, capture_output=True, timeout=300)
        expected = json.loads(full.read_text())
        key = "hashing / default"
        old = json.loads(full.read_text())
        old["tasks"]["routerbench_train:alpha"][key] = 0.0
        old["summary"]["routerbench"][key] = 0.0
        old["cpt"]["routerbench"][key] = {"cpt50": 1.0, "cpt80": 1.0}
        old["provenance"] = "kept"
        del old["removed"]  # a JSON written before loto.py counted them has none
        stale.write_text(json.dumps(old))
        only = ["--tasks", "routerbench_train:alpha", "--merge", str(stale), "--json", str(merged)]
        subprocess.run([*command, *only], cwd=REPO, check=True, capture_output=True, timeout=300)
        assert json.loads(merged.read_text()) == {**expected, "provenance": "kept"}
        refused = subprocess.run([*command, "--tasks", "routerbench_train:gamma"], cwd=REPO, capture_output=True)
        assert refused.returncode == 2
        assert b"--tasks: no such task in the data: routerbench_train:gamma" in refused.stderr
