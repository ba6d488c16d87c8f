"""Reading outcome data, labelling it, fitting and scoring routers, and the offline commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from routesvc import offline
from routesvc.encoders import HashingEncoder, WordLlamaEncoder
from routesvc.evaluation import evaluate_scores
from routesvc.fitting import FitError, FitSettings, FittedRouter, fit_router, label_records, model_alias, resolve_model
from routesvc.outcomes import OutcomeDataError, OutcomeRecord, read_outcomes
from tests.routing_data import STRONG, WEAK, records, write_jsonl

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "routing"


class TestOutcomes:
    def test_reads_a_file_or_a_folder(self, tmp_path: Path) -> None:
        """A folder yields every ``*.jsonl`` file's records, tagged with the file's stem."""
        write_jsonl(tmp_path / "a.jsonl", records("a")[:3])
        write_jsonl(tmp_path / "b.jsonl", records("b")[:2])
        (tmp_path / "notes.txt").write_text("ignored")
        assert [r.source for r in read_outcomes(tmp_path)] == ["a", "a", "a", "b", "b"]
        assert len(read_outcomes(tmp_path / "b.jsonl")) == 2

    def test_bad_lines_name_file_and_line(self, tmp_path: Path) -> None:
        """A malformed record raises ``OutcomeDataError`` with file:line."""
        path = tmp_path / "bad.jsonl"
        path.write_text('{"id": "1", "prompt": "p", "outcomes": {}}\n{"id": 2, "prompt": "p"}\n')
        with pytest.raises(OutcomeDataError, match=r"bad.jsonl:2"):
            read_outcomes(path)


class TestModelAlias:
    @pytest.mark.parametrize(
        ("name", "alias"),
        [
            ("Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b-instruct"),
            ("Mixtral-8x7B-Instruct-v0.1_concise", "mixtral-8x7b-instruct"),
            ("mistralai/Mistral-7B-Instruct-v0.1", "mistral-7b-instruct"),
            ("gpt-4-1106-preview", "gpt-4-1106-preview"),
        ],
    )
    def test_loose_names(self, name: str, alias: str) -> None:
        """Case, org prefixes, variant suffixes and version tails are ignored."""
        assert model_alias(name) == alias

    def test_exact_match_wins_and_ambiguity_is_none(self) -> None:
        """An exact id is preferred; two ids with the same alias match neither."""
        assert resolve_model("m-v1", ["M-v2", "m-v1"]) == "m-v1"
        assert resolve_model("m", ["M-v1", "m_concise"]) is None


class TestLabels:
    def test_pair_files_use_the_pair_and_others_a_proxy(self) -> None:
        """Files with the pair give strong - weak at weight 1; others top - mean of the rest at the proxy weight."""
        data = records("withpair") + records("without", strong="x-large", weak="x-small")
        labels = label_records(data, STRONG, WEAK, proxy_weight=0.25, calibrate_proxy=False)
        kinds = {u.source: u.kind for u in labels.usage}
        assert kinds == {"withpair": "pair", "without": "proxy"}
        hard = data[-1]  # a hard prompt of the proxy file: x-large 1, others 0 and 0.5
        assert labels.gap[-1] == pytest.approx(1.0 - 0.25)
        assert labels.weight[-1] == 0.25
        assert hard.source == "without"
        # An easy prompt of the pair file.
        assert labels.gap[0] == 0.0
        assert labels.weight[0] == 1.0

    def test_a_proxy_file_whose_best_model_is_the_weak_one_is_labelled_against_another(self) -> None:
        """A file without the strong model whose best model is the requested weak one: its proxy
        is its best other model minus the weak one, not the weak model minus itself (a gap of 0
        on every prompt, logged as "small-model - small-model")."""
        data = records("withpair") + records("px", strong=WEAK, weak="x-small")
        labels = label_records(data, STRONG, WEAK, calibrate_proxy=False)
        proxy = labels.usage[1]
        assert (proxy.kind, proxy.strong, proxy.weak) == ("proxy", "x-small", WEAK)
        assert proxy.describe() == f"px: 80 prompts, proxy label x-small - {WEAK} (proxy file: no prompt has the pair)"
        assert sorted(set(labels.gap[len(data) // 2 :])) == [-1.0, 0.0]

    def test_proxy_labels_are_calibrated_to_the_pair_files(self) -> None:
        """By default a proxy file's labels take the mean and spread of the pair-labelled files."""
        data = records("withpair") + records("without", strong="x-large", weak="x-small")
        labels = label_records(data, STRONG, WEAK)
        pair, proxy = labels.gap[: len(data) // 2], labels.gap[len(data) // 2 :]
        assert proxy.mean() == pytest.approx(pair.mean())
        assert proxy.std() == pytest.approx(pair.std())


class TestFittedRouter:
    def test_ranks_hard_prompts_above_easy_ones(self) -> None:
        """On held-out wording, the fitted router prefers the strong model for the hard prompts."""
        router = fit_router(records("train"), STRONG, WEAK, HashingEncoder(128), FitSettings(alpha=1.0))
        test = records("test")
        scores = router.scores([r.prompt.replace("a", "the a") for r in test])
        report = evaluate_scores(scores, [r.outcomes[STRONG] for r in test], [r.outcomes[WEAK] for r in test])
        assert report.apgr > 0.7
        assert ((scores >= 0.0) & (scores <= 1.0)).all()

    def test_an_empty_prompt_in_the_data_does_not_poison_the_fit(self) -> None:
        """A data row whose prompt is "" (WordLlama used to encode it as NaN, which turned every
        weight NaN and every score 1.0) still leaves a router that ranks hard above easy."""
        rows = records("train")
        empty = rows[0]
        rows.append(OutcomeRecord("empty", "", empty.task, empty.outcomes, empty.cost_usd, empty.source))
        router = fit_router(rows, STRONG, WEAK, WordLlamaEncoder(), FitSettings(alpha=1.0))
        assert not np.isnan(router.within.coef).any()
        test = records("test")
        scores = router.scores([r.prompt for r in test])
        report = evaluate_scores(scores, [r.outcomes[STRONG] for r in test], [r.outcomes[WEAK] for r in test])
        assert report.apgr > 0.7

    def test_the_neighbour_prior_of_many_prompts_takes_memory_in_rows_not_squared(self) -> None:
        """Scoring 3,000 prompts against a library of 3,000 (as fit does for all its training
        prompts) never holds the whole 3,000 x 3,000 similarity matrix (36 MB, and its argpartition
        72 MB more: 3.6 GB for the 14,000 shared prompts), and gives what it would give."""
        import tracemalloc

        router = fit_router(records(), STRONG, WEAK, HashingEncoder(32))
        generator = np.random.default_rng(7)
        router.library = generator.standard_normal((3000, 128)).astype(np.float32)
        router.library_prior = generator.standard_normal(3000)
        embeddings = generator.standard_normal((3000, 128)).astype(np.float32)
        tracemalloc.start()
        try:
            prior = router.prior(embeddings)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        k = min(router.settings.neighbours, 3000)
        nearest = np.argpartition(-(embeddings @ router.library.T), k - 1, axis=1)[:, :k]
        assert peak < 72_000_000  # half the whole matrix and its argpartition: 144 MB
        assert np.array_equal(prior, router.library_prior[nearest].mean(axis=1))

    def test_blank_prompts_score_zero(self) -> None:
        """An empty or whitespace prompt never asks for the strong model."""
        router = fit_router(records(), STRONG, WEAK, HashingEncoder(32))
        assert router.scores(["", "  \n"]).tolist() == [0.0, 0.0]

    def test_save_and_load_give_the_same_scores(self, tmp_path: Path) -> None:
        """An artifact round-trips, and holds no prompt text."""
        data = records()
        router = fit_router(data, STRONG, WEAK, HashingEncoder(64))
        router.save(tmp_path / "router")
        loaded = FittedRouter.load(tmp_path / "router")
        texts = [r.prompt for r in data[:10]]
        assert loaded.scores(texts) == pytest.approx(router.scores(texts))
        meta = (tmp_path / "router" / "router.json").read_text()
        assert all(r.prompt not in meta for r in data)

    def test_no_usable_data(self) -> None:
        """Records with fewer than two models cannot be fitted."""
        data = [r for r in records()]
        single = [type(r)(r.id, r.prompt, r.task, {STRONG: 1.0}, source="s") for r in data]
        with pytest.raises(FitError):
            fit_router(single, STRONG, WEAK, HashingEncoder(16))

    def test_a_pair_no_file_has_is_required_only_on_request(self) -> None:
        """``require_pair`` (what ``routesvc fit`` passes) raises ``FitError`` naming the model no
        file has; without it the library still fits such a pair on proxy labels alone."""
        data = records()
        with pytest.raises(FitError, match=r"no data file has the strong model 'nope' \(read 1: synthetic;"):
            fit_router(data, "nope", WEAK, HashingEncoder(16), require_pair=True)
        router = fit_router(data, "nope", WEAK, HashingEncoder(16))
        assert [u.describe() for u in router.usage] == [
            f"synthetic: 80 prompts, proxy label {STRONG} - {WEAK} (proxy file: no prompt has the pair)"
        ]

    def test_missing_artifact(self, tmp_path: Path) -> None:
        """Loading a folder that is not a router raises ``FitError``."""
        with pytest.raises(FitError):
            FittedRouter.load(tmp_path)


class TestKindPrior:
    """Prompts of the kinds the strong model is for (code, multi-step reasoning) get a fixed share
    of the score spread added: a prior, since the data sets disagree on it (docs/routing-quality.md)."""

    def test_strong_kinds_get_kind_weight_spreads_of_the_score(self) -> None:
        data = records()
        kinds = ["chat", "code_generation", "multi_step_reasoning", "creative_writing"]
        router = fit_router(
            data, STRONG, WEAK, HashingEncoder(64), FitSettings(kind_weight=2.0), labeller=lambda t: ["chat"] * len(t)
        )
        without = fit_router(data, STRONG, WEAK, HashingEncoder(64), FitSettings(kind_weight=0.0))
        texts = [r.prompt for r in data]
        spread = float(without.raw(texts, without.encoder.encode(texts)).std())
        assert router.kind_offset == pytest.approx(2.0 * spread)
        assert without.kind_offset == 0.0
        four = texts[:4]
        vectors = router.encoder.encode(four)
        added = router.raw(four, vectors, kinds) - without.raw(four, vectors)
        assert added == pytest.approx([0.0, 2.0 * spread, 2.0 * spread, 0.0])

    def test_the_shipped_classifier_labels_kinds_by_default(self) -> None:
        """With no labeller, a code request gets the prior and a greeting does not."""
        router = fit_router(records(), STRONG, WEAK, HashingEncoder(64))
        texts = ["Write a Python function that merges two sorted lists.", "Hi there, how are you today?"]
        assert router.label(texts) == ["code_generation", "chat"]
        assert router.kind_prior(texts).tolist() == [router.kind_offset, 0.0]
        assert router.kind_offset > 0

    def test_calibration_counts_the_prior(self) -> None:
        """The quantiles are of the training scores with the prior, so a threshold still sends the
        share of training-like traffic it says: half of the training prompts score at least 0.5."""
        data = records()

        def labeller(texts: Sequence[str]) -> list[str]:
            return ["code_generation" if i % 2 else "chat" for i in range(len(texts))]

        router = fit_router(data, STRONG, WEAK, HashingEncoder(64), labeller=labeller)
        texts = [r.prompt for r in data]
        calibrated = router.calibrate(router.raw(texts, router.encoder.encode(texts), labeller(texts)))
        assert float((calibrated >= 0.5).mean()) == pytest.approx(0.5, abs=0.02)

    def test_saved_with_the_router_and_old_artifacts_load_without_it(self, tmp_path: Path) -> None:
        """The offset and the kinds round-trip; a version 1 artifact (before the prior) loads with
        the prior off, so it scores as it did when it was written."""
        data = records()
        router = fit_router(data, STRONG, WEAK, HashingEncoder(64), labeller=lambda t: ["code_generation"] * len(t))
        router.save(tmp_path / "r")
        loaded = FittedRouter.load(tmp_path / "r", labeller=lambda t: ["code_generation"] * len(t))
        assert loaded.kind_offset == router.kind_offset > 0
        assert loaded.settings.strong_kinds == ("code_generation", "multi_step_reasoning")
        meta = json.loads((tmp_path / "r" / "router.json").read_text())
        meta["version"] = 1
        del meta["kind_offset"]
        for name in ("kind_weight", "strong_kinds"):
            del meta["settings"][name]
        (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
        old = FittedRouter.load(tmp_path / "r")
        assert old.kind_offset == 0.0
        assert old.settings.kind_weight == 0.0
        texts = [r.prompt for r in data[:6]]
        vectors = old.encoder.encode(texts)
        assert old.raw(texts, vectors) == pytest.approx(router.raw(texts, vectors) - router.kind_offset)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("kind_offset", float("nan")),
            ("kind_offset", -1.0),
            ("kind_offset", "lots"),
            ("encoder", "nope"),
            ("encoder", ["hashing-64"]),
            ("encoder", {"name": "hashing-64"}),
            ("within", None),
            ("within", [1, 2]),
            ("settings", "ab"),
            ("settings", [1]),
            ("quantiles", {"a": 1}),
        ],
    )
    def test_a_damaged_artifact_is_a_fit_error(self, tmp_path: Path, field: str, value: object) -> None:
        """A hand-edited or truncated router.json is refused with the folder named, never a bare
        KeyError or a NaN score (an encoder that was a list was an AttributeError traceback)."""
        fit_router(records(), STRONG, WEAK, HashingEncoder(64)).save(tmp_path / "r")
        meta = json.loads((tmp_path / "r" / "router.json").read_text())
        if value is None:
            del meta[field]
        else:
            meta[field] = value
        (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
        with pytest.raises(FitError, match=r"/r: not a fitted router"):
            FittedRouter.load(tmp_path / "r")

    @pytest.mark.parametrize(
        ("damage", "problem"),
        [
            ("router.json a list", r"not a fitted router \(router\.json is not a JSON object\)"),
            ("version true", r"artifact version True, expected 2"),
            ("embeddings of another width", r"embeddings of shape \(80, 32\), the encoder 'hashing-64' gives 64"),
            ("prior shorter than the library", r"80 embeddings and a prior of shape \(10,\)"),
            ("one lexical feature fewer", r"saved with 14 lexical features, not the 15 this version computes"),
            ("weights one column short", r"within-task weights have shapes"),
            ("empty quantiles", r"quantiles must be a non-empty list of finite numbers"),
            ("quantiles out of order", r"quantiles must be in increasing order"),
            ("neighbours 0", r"settings\.neighbours 0 is not a whole number of at least 1"),
            ("a NaN prior", r"not finite"),
        ],
    )
    def test_parts_that_do_not_fit_together_are_a_fit_error(self, tmp_path: Path, damage: str, problem: str) -> None:
        """An artifact whose parts disagree (the library and the encoder, the library and its prior,
        the weights and the features, the quantiles, the settings) is refused at load with the folder
        and the mismatch named: not an error on the first prompt scored, nor a NaN score."""
        folder = tmp_path / "r"
        fit_router(records(), STRONG, WEAK, HashingEncoder(64)).save(folder)
        meta = json.loads((folder / "router.json").read_text())
        with np.load(folder / "library.npz") as arrays:
            embeddings, prior = arrays["embeddings"], arrays["prior"]
        if damage == "router.json a list":
            meta = [meta]
        elif damage == "version true":
            meta["version"] = True
        elif damage == "embeddings of another width":
            embeddings = embeddings[:, :32]
        elif damage == "prior shorter than the library":
            prior = prior[:10]
        elif damage == "one lexical feature fewer":
            meta["lexical_features"] = meta["lexical_features"][:-1]
            for name in ("mean", "scale", "coef"):
                meta["within"][name] = meta["within"][name][:-1]
        elif damage == "weights one column short":
            meta["within"]["coef"] = meta["within"]["coef"][:-1]
        elif damage == "empty quantiles":
            meta["quantiles"] = []
        elif damage == "quantiles out of order":
            meta["quantiles"] = meta["quantiles"][::-1]
        elif damage == "neighbours 0":
            meta["settings"]["neighbours"] = 0
        else:
            prior = prior.copy()
            prior[3] = np.nan
        (folder / "router.json").write_text(json.dumps(meta))
        np.savez_compressed(folder / "library.npz", embeddings=embeddings, prior=prior)
        with pytest.raises(FitError, match=rf"^{tmp_path}/r: .*{problem}"):
            FittedRouter.load(folder)

    @pytest.mark.parametrize(
        ("damage", "problem"),
        [
            ("empty", r"EOFError: No data left in file"),
            ("truncated", r"BadZipFile: File is not a zip file"),
            ("a damaged member", r"zlib\.error: Error -3 while decompressing data"),
        ],
    )
    def test_a_library_that_cannot_be_read_is_a_fit_error(self, tmp_path: Path, damage: str, problem: str) -> None:
        """A library.npz that is empty (a full disk), cut short or with a damaged member is refused
        as not a fitted router, with the folder and the failure named (an empty one was a bare
        EOFError, a damaged one a zlib.error: a traceback at start and an internal error on reload)."""
        folder = tmp_path / "r"
        fit_router(records(), STRONG, WEAK, HashingEncoder(64)).save(folder)
        data = (folder / "library.npz").read_bytes()
        if damage == "empty":
            data = b""
        elif damage == "truncated":
            data = data[: len(data) // 2]
        else:
            data = data[:60] + bytes(byte ^ 0xFF for byte in data[60:200]) + data[200:]
        (folder / "library.npz").write_bytes(data)
        with pytest.raises(FitError, match=rf"^{folder}: not a fitted router \({problem}"):
            FittedRouter.load(folder)

    def test_score_with_a_mismatched_artifact_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """score with a router whose library is of another width: one line naming the folder, exit 2."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        folder = tmp_path / "r"
        fit_router(records(), STRONG, WEAK, HashingEncoder(64)).save(folder)
        with np.load(folder / "library.npz") as arrays:
            np.savez_compressed(folder / "library.npz", embeddings=arrays["embeddings"][:, :32], prior=arrays["prior"])
        assert run("score", "--router", str(folder), "--data", str(data), "--out", str(tmp_path / "s.jsonl")) == 2
        assert capsys.readouterr().err == (
            f"error: {folder}: the router's parts do not fit together: library.npz holds embeddings of shape"
            " (80, 32), the encoder 'hashing-64' gives 64 values\n"
        )
        assert not (tmp_path / "s.jsonl").exists()

    def test_fit_kind_weight_flag(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--kind-weight 0 turns the prior off; a negative or non-finite weight is refused."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        out = tmp_path / "router"
        argv = ("fit", "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--out", str(out))
        assert run(*argv, "--encoder", "hashing-256") == 0
        assert "kind prior: +" in capsys.readouterr().err
        assert run(*argv, "--encoder", "hashing-256", "--kind-weight", "0") == 0
        assert json.loads((out / "router.json").read_text())["kind_offset"] == 0.0
        assert "kind prior" not in capsys.readouterr().err
        for bad in ("-1", "nan", "inf", "lots"):
            with pytest.raises(SystemExit):
                run(*argv, "--kind-weight", bad)
            assert "--kind-weight" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("flag", "value"),
        [
            ("--neighbours", "0"),
            ("--neighbours", "-3"),
            ("--neighbours", "2.5"),
            ("--prior-weight", "nan"),
            ("--prior-weight", "inf"),
            ("--proxy-weight", "nan"),
            ("--proxy-weight", "-1"),
        ],
    )
    def test_fit_knobs_that_give_an_unloadable_router_are_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
    ) -> None:
        """A fit setting whose router could not be loaded (no neighbours, a NaN prior weight) or
        whose fit would not be finite is refused when the arguments are read, naming the flag,
        and nothing is written (it wrote a router that score then refused, exit 0)."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        out = tmp_path / "router"
        with pytest.raises(SystemExit) as exited:
            run("fit", "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--out", str(out), flag, value)
        assert exited.value.code == 2
        assert f"error: argument {flag}: {value!r}" in capsys.readouterr().err
        assert not out.exists()

    @pytest.mark.parametrize("encoder", ["hashing-0", "wordllama-l2-0", "hashing-256+hashing-00"])
    def test_fit_with_an_encoder_of_no_dimension_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], encoder: str
    ) -> None:
        """An encoder of dimension 0 is refused before the data is read: one line naming it,
        exit 2 (hashing-0 was a ZeroDivisionError traceback)."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        out = tmp_path / "router"
        argv = ("fit", "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--out", str(out))
        assert run(*argv, "--encoder", encoder) == 2
        part = encoder.rsplit("+", 1)[-1]
        assert capsys.readouterr().err == (
            f"error: encoder {part!r}: the dimension must be a whole number of at least 1\n"
        )
        assert not out.exists()


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="routesvc")
    offline.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


class TestOfflineCommands:
    def test_fit_score_eval_classify(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """fit writes a router; score writes one {source, id, score} per prompt; eval prints the metrics as JSON."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        out = tmp_path / "router"
        assert run("fit", "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--out", str(out)) == 0
        assert run("score", "--router", str(out), "--data", str(data), "--out", str(tmp_path / "s.jsonl")) == 0
        scores = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
        assert [s["id"] for s in scores] == [r.id for r in records()]
        capsys.readouterr()
        assert run("eval", "--router", str(out), "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert sorted(report) == sorted(  # the keys docs/routing-quality.md lists
            [
                "prompts",
                "strong_quality",
                "weak_quality",
                "apgr",
                "oracle_apgr",
                "cpt50",
                "cpt80",
                "aiq",
                "cost_strong_usd",
                "savings_at_95_usd",
                "strong_share_at_95",
            ]
        )
        assert report["apgr"] > 0.7
        assert report["aiq"] is not None
        assert run("classify", "--data", str(data), "--out", str(tmp_path / "l.jsonl")) == 0
        labels = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
        assert len(labels) == len(scores)
        assert {label["task"] for label in labels} <= {
            "code_generation",
            "multi_step_reasoning",
            "creative_writing",
            "summarization",
            "extraction",
            "simple_qa",
            "chat",
            "other",
        }

    def test_eval_warns_when_the_pair_has_no_gap_to_recover(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Judged with the pair swapped (the weak model beats the "strong" one), eval still reports
        but says on stderr that APGR has no gap to measure; with the right pair it says nothing."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        out = tmp_path / "router"
        assert run("fit", "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--out", str(out)) == 0
        capsys.readouterr()
        assert run("eval", "--router", str(out), "--data", str(data), "--strong", WEAK, "--weak", STRONG) == 0
        assert f"warning: {WEAK} does not beat {STRONG}" in capsys.readouterr().err
        assert run("eval", "--router", str(out), "--data", str(data), "--strong", STRONG, "--weak", WEAK) == 0
        assert "warning" not in capsys.readouterr().err

    def test_errors_are_reported_with_exit_code_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A missing data path is a clean error, not a traceback."""
        assert run("fit", "--data", str(tmp_path / "nope"), "--strong", "a", "--weak", "b", "--out", str(tmp_path)) == 2
        assert "no such file or folder" in capsys.readouterr().err

    def test_a_folder_without_data_files_is_an_error(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A folder with no *.jsonl file (a typo'd path, data saved as .json): exit 2 saying so, and
        score writes nothing (it wrote an empty file and exited 0; fit blamed the models)."""
        folder = tmp_path / "data"
        folder.mkdir()
        (folder / "train.json").write_text("{}\n")
        router = tmp_path / "router"
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(router)
        out = tmp_path / "s.jsonl"
        assert run("score", "--router", str(router), "--data", str(folder), "--out", str(out)) == 2
        assert run("fit", "--data", str(folder), "--strong", STRONG, "--weak", WEAK, "--out", str(router)) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {folder}: no *.jsonl files in this folder"] * 2
        assert not out.exists()

    def test_one_data_set_given_twice_or_two_of_one_name_are_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file is a data set named by its file name: the same folder given twice (its records
        counted twice) or two folders' data.jsonl (taken for one data set, their models pooled)
        is exit 2 naming both, not a fit."""
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            write_jsonl(tmp_path / name / "data.jsonl", records(name))
        out = tmp_path / "router"
        twice = ("--data", str(tmp_path / "a"), "--data", str(tmp_path / "a"))
        assert run("fit", *twice, "--strong", STRONG, "--weak", WEAK, "--out", str(out)) == 2
        assert (
            capsys.readouterr().err.splitlines()[-1]
            == f"error: {tmp_path / 'a' / 'data.jsonl'}: given twice (its records would count twice)"
        )
        both = ("--data", str(tmp_path / "a"), "--data", str(tmp_path / "b"))
        assert run("fit", *both, "--strong", STRONG, "--weak", WEAK, "--out", str(out)) == 2
        assert f"another data file is named data.jsonl ({tmp_path / 'a' / 'data.jsonl'})" in capsys.readouterr().err
        assert not out.exists()

    def test_score_writes_its_file_whole_or_leaves_the_old_one(self, tmp_path: Path) -> None:
        """The disk refuses the output part way (a file size limit of 64 KiB, for 2,000 scores):
        exit 2 naming --out, the previous output still there, whole, and no partial file beside
        it (the output was written in place: cut at 64 KiB, mid-line, the old one gone)."""
        import subprocess
        import sys

        rows = [
            OutcomeRecord(f"p{n}", r.prompt, r.task, r.outcomes, r.cost_usd, r.source)
            for n, r in enumerate(records() * (2000 // len(records()) + 1))
        ][:2000]
        data = write_jsonl(tmp_path / "train.jsonl", rows)
        router = tmp_path / "router"
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(router)
        out = tmp_path / "s.jsonl"
        out.write_text('{"old": true}\n')
        limited = (
            "import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
            "from routesvc.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n"
        )
        argv = ["score", "--router", str(router), "--data", str(data), "--out", str(out)]
        done = subprocess.run([sys.executable, "-c", limited, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {out}: ")
        assert out.read_text() == '{"old": true}\n'
        assert sorted(p.name for p in tmp_path.iterdir()) == ["router", "s.jsonl", "train.jsonl"]

    def test_eval_says_when_some_prompts_have_no_cost(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """One prompt without a cost for the pair: AIQ and the savings are left out, and a warning
        says how many prompts lack one and names the first (they were left out silently)."""
        rows = records()
        first = rows[3]
        rows[3] = OutcomeRecord(first.id, first.prompt, first.task, first.outcomes, {}, first.source)
        data = write_jsonl(tmp_path / "train.jsonl", rows)
        router = tmp_path / "router"
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(router)
        capsys.readouterr()
        assert (
            run("eval", "--router", str(router), "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--json") == 0
        )
        captured = capsys.readouterr()
        assert json.loads(captured.out)["aiq"] is None
        assert (
            f"warning: 1 of {len(rows)} prompts have no cost_usd for both models (the first: train id {first.id})"
            in captured.err
        )

    def test_a_byte_order_mark_is_not_data(self, tmp_path: Path) -> None:
        """A file that starts with a UTF-8 byte order mark (as some Windows tools write) is read
        (its first line was refused as not JSON)."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
        assert [r.id for r in read_outcomes(data)] == [r.id for r in records()]

    def test_fit_of_a_model_no_file_has_fails(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--strong or --weak that no data file has: exit 2 naming the model, nothing written (it
        used to fit the file's strongest model against the weak one and exit 0)."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        out = tmp_path / "router"
        assert run("fit", "--data", str(data), "--strong", "nope", "--weak", WEAK, "--out", str(out)) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            "error: no data file has the strong model 'nope' (read 1: train; models match by id or loose alias)"
        )
        assert run("fit", "--data", str(data), "--strong", "nope", "--weak", "nah", "--out", str(out)) == 2
        assert "the strong model 'nope' or the weak model 'nah'" in capsys.readouterr().err
        assert not out.exists()

    @pytest.mark.parametrize("weak", [STRONG, STRONG.upper(), f"org/{STRONG}-v1.0"])
    def test_a_pair_of_one_model_is_refused(
        self, weak: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--strong and --weak that are, or match by loose alias, the same model of a file: fit writes no
        router and eval reports nothing (exit 2, one line): there is no choice between them to learn."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        out = tmp_path / "router"
        assert run("fit", "--data", str(data), "--strong", STRONG, "--weak", weak, "--out", str(out)) == 2
        expected = (
            f"error: the strong model {STRONG!r} and the weak model {weak!r} are the same model in train"
            f" ({STRONG!r}; models match by id or loose alias): "
        )
        assert capsys.readouterr().err.splitlines()[-1] == expected + "a router between them learns nothing"
        assert not out.exists()
        fit_router(records(), STRONG, WEAK, HashingEncoder(64)).save(out)
        assert run("eval", "--router", str(out), "--data", str(data), "--strong", STRONG, "--weak", weak) == 2
        captured = capsys.readouterr()
        assert captured.err.splitlines()[-1] == expected + "there is no choice to evaluate"
        assert captured.out == ""

    def test_fit_needs_one_file_with_both_models(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Each model in some file but never together: exit 2 saying where each one is."""
        write_jsonl(tmp_path / "a.jsonl", records("a", weak="x-small"))
        write_jsonl(tmp_path / "b.jsonl", records("b", strong="x-large"))
        argv = ("fit", "--data", str(tmp_path), "--strong", STRONG, "--weak", WEAK, "--out", str(tmp_path / "r"))
        assert run(*argv) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: no prompt has outcomes for both '{STRONG}' and '{WEAK}' ('{STRONG}' in a, '{WEAK}' in b): at"
            " least one file needs prompts with the pair; files without it are then used as proxies"
        )

    def test_fit_uses_files_without_the_pair_beside_one_with_it(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The documented mix: one file with the pair, another without it as a proxy; fit succeeds."""
        write_jsonl(tmp_path / "withpair.jsonl", records("withpair"))
        write_jsonl(tmp_path / "without.jsonl", records("without", strong="x-large", weak="x-small"))
        argv = ("fit", "--data", str(tmp_path), "--strong", STRONG, "--weak", WEAK, "--out", str(tmp_path / "r"))
        assert run(*argv, "--encoder", "hashing-256") == 0
        err = capsys.readouterr().err
        assert "without: 80 prompts, proxy label x-large - mean of the others" in err
        assert f"withpair: 80 prompts, pair label {STRONG} - {WEAK}" in err

    def test_eval_plot(self, tmp_path: Path) -> None:
        """--plot writes a PNG."""
        data = write_jsonl(tmp_path / "d.jsonl", records())
        router = fit_router(records(), STRONG, WEAK, HashingEncoder(32))
        router.save(tmp_path / "r")
        plot = tmp_path / "curve.png"
        assert (
            run(
                "eval",
                "--router",
                str(tmp_path / "r"),
                "--data",
                str(data),
                "--strong",
                STRONG,
                "--weak",
                WEAK,
                "--plot",
                str(plot),
            )
            == 0
        )
        assert plot.read_bytes()[:4] == b"\x89PNG"


def _without(rows: list[OutcomeRecord], source: str, drop: Callable[[int], Sequence[str]]) -> list[OutcomeRecord]:
    """``rows`` as file ``source``, with the models ``drop(i)`` names left out of row i's outcomes."""
    return [
        OutcomeRecord(
            id=r.id,
            prompt=r.prompt,
            task=r.task,
            outcomes={m: v for m, v in r.outcomes.items() if m not in drop(i)},
            cost_usd={m: v for m, v in r.cost_usd.items() if m not in drop(i)},
            source=source,
        )
        for i, r in enumerate(rows)
    ]


def _fit(tmp_path: Path, data: Path, *more: str, strong: str = STRONG, weak: str = WEAK) -> int:
    out = tmp_path / "router"
    return run("fit", "--data", str(data), "--strong", strong, "--weak", weak, "--out", str(out), *more)


class TestPartlyEvaluatedFiles:
    """A model missing on some of a file's prompts ("not evaluated", as the data format allows)."""

    def test_a_file_whose_pair_is_missing_on_some_prompts_is_fitted_on_the_prompts_that_have_it(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each model of the pair missing on a different seventh of the prompts (56 of 80 have
        both): fit uses those 56 with the pair, beside a complete file and alone, says so in its
        log and router.json, and eval uses the same 56 (it was left out without a word, and alone
        fit said "no record has outcomes for two or more models")."""
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "full.jsonl", records("full"))
        patchy = _without(records(), "patchy", lambda i: {0: [STRONG, "other"], 1: [WEAK, "other"]}.get(i % 7, []))
        write_jsonl(folder / "patchy.jsonl", patchy)
        assert _fit(tmp_path, folder, "--encoder", "hashing-256") == 0
        line = f"patchy: 56 of 80 prompts, pair label {STRONG} - {WEAK} (pair file: the pair on 56 of 80 prompts)"
        assert f"  {line}\n" in capsys.readouterr().err
        assert line in json.loads((tmp_path / "router" / "router.json").read_text())["files"]
        alone = folder / "patchy.jsonl"
        assert _fit(tmp_path, alone, "--encoder", "hashing-256") == 0
        assert f"  {line}\n" in capsys.readouterr().err
        argv = ("eval", "--router", str(tmp_path / "router"), "--data", str(alone), "--strong", STRONG, "--weak", WEAK)
        assert run(*argv) == 0
        assert f"patchy: 56 of 80 prompts, pair {STRONG} - {WEAK}" in capsys.readouterr().err

    def test_a_strong_model_missing_on_a_fifth_of_the_prompts_still_labels_with_the_pair(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The strong model missing on every fifth prompt of a file that has other models: pair
        labels on the 64 prompts with both (it was a proxy file beside a pair file, and alone "no
        data file has the strong model")."""
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "full.jsonl", records("full"))
        write_jsonl(folder / "partial.jsonl", _without(records(), "partial", lambda i: [STRONG] if i % 5 == 0 else []))
        assert _fit(tmp_path, folder, "--encoder", "hashing-256") == 0
        line = f"partial: 64 of 80 prompts, pair label {STRONG} - {WEAK} (pair file: the pair on 64 of 80 prompts)"
        assert f"  {line}\n" in capsys.readouterr().err
        assert _fit(tmp_path, folder / "partial.jsonl", "--encoder", "hashing-256") == 0
        assert f"  {line}\n" in capsys.readouterr().err

    def test_a_file_that_gives_no_label_is_logged_as_skipped_with_why(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file with one model evaluated throughout and no prompt with the pair cannot give a pair
        or a proxy label: fit's log and router.json say it was skipped and why; alone, fit fails
        saying so (it was left out without a word, and alone the error was that no record had two
        models)."""
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "full.jsonl", records("full"))
        lonely = _without(records(), "lonely", lambda i: [WEAK, "other"] if i % 2 else [STRONG, "other"])
        alone = [r for r in lonely if STRONG in r.outcomes][:34] + [r for r in lonely if WEAK in r.outcomes][:1]
        write_jsonl(folder / "lonely.jsonl", alone)
        assert _fit(tmp_path, folder, "--encoder", "hashing-256") == 0
        skipped = (
            "lonely: 35 prompts, skipped (no prompt has outcomes for both models of the pair, and 1 model evaluated"
            " on 90% or more of its prompts, where a proxy label needs two)"
        )
        assert f"  {skipped}\n" in capsys.readouterr().err
        assert skipped in json.loads((tmp_path / "router" / "router.json").read_text())["files"]
        assert _fit(tmp_path, folder / "lonely.jsonl") == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: no prompt has outcomes for both '{STRONG}' and '{WEAK}' ('{STRONG}' in lonely, '{WEAK}' in"
            " lonely): at least one file needs prompts with the pair; files without it are then used as proxies"
        )

    def test_a_name_ambiguous_in_one_file_is_absent_there_and_the_other_files_give_the_pair(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--weak small-model where one file has small-model-v0.1 and small-model-v0.2 (as the
        shared data's mmlu_pro has two Mistral-7B-Instruct) beside a file with the pair: that file
        is taken not to have the weak model (a proxy, against the mean of the others), the log
        names both candidates, and fit and eval use the pair file (both failed "ambiguous in two",
        exit 2, though the pair file gave the pair)."""
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "one.jsonl", records("one"))
        rows = records(weak="small-model-v0.1")
        both = [
            OutcomeRecord(r.id, r.prompt, r.task, {**r.outcomes, "small-model-v0.2": 0.5}, source="two") for r in rows
        ]
        write_jsonl(folder / "two.jsonl", both)
        candidates = "'small-model-v0.1', 'small-model-v0.2'"
        note = f"the weak model {WEAK!r} matches {candidates} here by loose alias: taken as absent"
        assert _fit(tmp_path, folder, "--encoder", "hashing-256") == 0
        proxy = f"proxy label {STRONG} - mean of the others (proxy file: no prompt has the pair)"
        line = f"two: 80 prompts, {proxy}; {note}"
        assert f"  {line}\n" in capsys.readouterr().err
        assert line in json.loads((tmp_path / "router" / "router.json").read_text())["files"]
        argv = ("eval", "--router", str(tmp_path / "router"), "--data", str(folder), "--strong", STRONG, "--weak", WEAK)
        assert run(*argv) == 0
        err = capsys.readouterr().err
        assert f"  one: 80 of 80 prompts, pair {STRONG} - {WEAK}\n" in err
        assert f"  two: 80 prompts, skipped (no model matches the pair); {note}\n" in err

    def test_a_name_ambiguous_in_the_only_file_fails_saying_so(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The file with small-model-v0.1 and small-model-v0.2 alone: no file gives the pair, so
        fit and eval fail (exit 2), naming the two candidates; the exact id fits."""
        rows = records(weak="small-model-v0.1")
        both = [
            OutcomeRecord(r.id, r.prompt, r.task, {**r.outcomes, "small-model-v0.2": 0.5}, source="two") for r in rows
        ]
        data = write_jsonl(tmp_path / "two.jsonl", both)
        note = f"in two the weak model {WEAK!r} matches 'small-model-v0.1', 'small-model-v0.2' here by loose alias"
        assert _fit(tmp_path, data, "--encoder", "hashing-256") == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: no data file has the weak model {WEAK!r} (read 1: two; models match by id or loose alias); "
            f"{note}: taken as absent"
        )
        assert not (tmp_path / "router").exists()
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(tmp_path / "r")
        argv = ("eval", "--router", str(tmp_path / "r"), "--data", str(data), "--strong", STRONG, "--weak", WEAK)
        assert run(*argv) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: no prompt has outcomes for both {STRONG!r} and {WEAK!r} (models match by id or loose alias); "
            f"{note}: taken as absent"
        )
        assert _fit(tmp_path, data, "--encoder", "hashing-256", weak="small-model-v0.2") == 0

    def test_an_exact_id_wins_over_an_alias_and_a_version_asked_is_not_matched_to_another(self) -> None:
        """--weak small-model-v0.2: a file naming it only on a few prompts, beside a common
        small-model, uses small-model-v0.2 (the common alias match was taken), and a file with
        only small-model-v0.1 does not have it (it paired v0.1, as the shared data's arena_chat was
        paired with Mistral-7B-Instruct-v0.1 when v0.2 was asked); an unversioned id still matches."""
        asked = "small-model-v0.2"
        few = [
            OutcomeRecord(r.id, r.prompt, r.task, {**r.outcomes, asked: 0.0} if i < 5 else r.outcomes, source="few")
            for i, r in enumerate(records())
        ]
        data = few + records("v01", weak="small-model-v0.1") + records("plain")
        usage = {u.source: u for u in label_records(data, STRONG, asked, calibrate_proxy=False).usage}
        assert (usage["few"].kind, usage["few"].has_weak, usage["few"].weak) == ("proxy", True, "mean of the others")
        assert (usage["v01"].kind, usage["v01"].has_weak) == ("proxy", False)
        assert (usage["plain"].kind, usage["plain"].weak) == ("pair", WEAK)


class TestWhichRuleUsesAFile:
    """A file is a pair file with the pair on half or more of its prompts, else a proxy file with
    two common models, else labelled with the pair where it has it, else skipped."""

    def test_a_file_with_the_pair_on_a_few_prompts_is_a_proxy_on_all_of_them(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The strong model on 3 of a file's 80 prompts: the file is a proxy on all 80 (its best
        common model other than the weak one, minus the weak one), not a pair file on 3 with 77
        unused, which measured worse (APGR .522 vs .544); the rule applied is logged and saved."""
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "full.jsonl", records("full"))
        write_jsonl(folder / "few.jsonl", _without(records(), "few", lambda i: [STRONG] if i >= 3 else []))
        assert _fit(tmp_path, folder, "--encoder", "hashing-256") == 0
        err = capsys.readouterr().err
        line = f"few: 80 prompts, proxy label other - {WEAK} (proxy file: the pair on 3 of 80 prompts, under half)"
        assert f"  {line}\n" in err
        assert f"  full: 80 prompts, pair label {STRONG} - {WEAK} (pair file: the pair on 80 of 80 prompts)\n" in err
        assert "warning" not in err
        assert line in json.loads((tmp_path / "router" / "router.json").read_text())["files"]

    def test_a_proxy_files_top_model_is_a_common_one_not_a_rare_strong_model(self) -> None:
        """The strong model on 5 of a proxy file's 80 prompts (no weak model): its proxy is its
        best common model on all 80 prompts (it was the strong model, on those 5 only)."""
        rare = _without(records(weak="x-small"), "rare", lambda i: [STRONG] if i >= 5 else [])
        labels = label_records(records("full") + rare, STRONG, WEAK, calibrate_proxy=False)
        proxy = labels.usage[1]
        assert (proxy.kind, proxy.strong, proxy.weak, proxy.labelled) == ("proxy", "x-small", "mean of the others", 80)
        assert (labels.weight[80:] > 0).all()

    def test_a_file_of_one_common_model_is_labelled_with_the_pair_where_it_has_it_and_warned_of(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file whose only common model is the strong one, with the weak one on 4 of its 80
        prompts: no proxy is possible, so those 4 are labelled with the pair, the rule is logged,
        and fit warns that under 10% of the file is labelled."""
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "full.jsonl", records("full"))
        lonely = _without(records(), "lonely", lambda i: ["other"] + ([WEAK] if i % 20 else []))
        write_jsonl(folder / "lonely.jsonl", lonely)
        assert _fit(tmp_path, folder, "--encoder", "hashing-256") == 0
        err = capsys.readouterr().err
        rule = (
            "the pair on 4 of 80 prompts, under half, and 1 model on 90% or more of its prompts, where a proxy label"
            " needs two"
        )
        assert f"  lonely: 4 of 80 prompts, pair label {STRONG} - {WEAK} ({rule})\n" in err
        assert (
            f"warning: lonely: only 4 of its 80 prompts are labelled ({rule}): the file's other prompts teach the"
            " router nothing\n"
        ) in err


class TestLoadWhileAFitReplacesTheRouter:
    def test_a_load_between_a_fits_two_renames_reads_the_new_router(self, tmp_path: Path) -> None:
        """No folder at --out when the load begins (a fit has renamed the old router aside and
        not yet the new one in), the new one renamed in 10 ms later: the load reads it (it
        failed at once, "not a fitted router (FileNotFoundError ...)", as a server start or
        score racing a fit did now and then); a folder that stays missing still fails."""
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(tmp_path / "new")
        out = tmp_path / "router"
        timer = threading.Timer(0.01, (tmp_path / "new").rename, args=(out,))
        timer.start()
        try:
            router = FittedRouter.load(out, encoder=HashingEncoder(32))
        finally:
            timer.join()
        assert len(router.library) == len(records())
        with pytest.raises(FitError, match=r"missing: not a fitted router \(FileNotFoundError"):
            FittedRouter.load(tmp_path / "missing", encoder=HashingEncoder(32))

    def test_a_router_replaced_between_its_two_reads_loads_as_one_router(self, tmp_path: Path) -> None:
        """A fit renames its router into place (``_save_whole``) after the loader has opened
        router.json and before it opens library.npz: the loader gets one fit's weights and
        library, never the old weights with the new library (it read both by path, so the 40-prompt
        router's quantiles came with the 80-prompt router's library, and nothing noticed).

        The old router.json is a named pipe, so the loader waits in it, deterministically, while
        the test swaps the folder, then gets the old router.json's bytes."""
        old = fit_router(records()[::2], STRONG, WEAK, HashingEncoder(32))
        new = fit_router(records(), STRONG, WEAK, HashingEncoder(32))
        out = tmp_path / "router"
        old.save(out)
        old_meta = (out / "router.json").read_bytes()
        (out / "router.json").unlink()
        os.mkfifo(out / "router.json")
        swapped: list[BaseException] = []

        def swap_while_the_loader_reads() -> None:
            try:
                fd = os.open(out / "router.json", os.O_WRONLY)  # returns once the loader opened it
                try:
                    offline._save_whole(new, out)
                    os.write(fd, old_meta)
                finally:
                    os.close(fd)
            except BaseException as exc:
                swapped.append(exc)

        writer = threading.Thread(target=swap_while_the_loader_reads)
        writer.start()
        loaded = FittedRouter.load(out)
        writer.join(30)
        assert swapped == []
        assert (len(loaded.library), len(loaded.quantiles)) in ((40, 1001), (80, 1001))
        expected = old if len(loaded.library) == 40 else new
        assert loaded.quantiles == pytest.approx(expected.quantiles)
        assert loaded.library_prior == pytest.approx(expected.library_prior)


class TestFitWarnings:
    def test_fit_warns_when_too_few_prompts_have_the_pair(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A one-prompt file fits (exit 0: the router is written) but says on stderr that so few
        prompts teach nothing (it fitted silently a router that scores every prompt 1.0)."""
        data = write_jsonl(tmp_path / "one.jsonl", records()[-1:])
        assert _fit(tmp_path, data, "--encoder", "hashing-256") == 0
        err = capsys.readouterr().err
        assert f"warning: only 1 prompt has outcomes for both {STRONG} and {WEAK}: a router fitted on under 50" in err
        assert (tmp_path / "router" / "router.json").exists()

    def test_fit_warns_when_the_strong_model_is_not_better(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--strong names the worse model of the pair: fit warns as eval does (it said nothing, and
        the router sends hard prompts to the worse model); with the pair the right way round, no
        warning."""
        data = write_jsonl(tmp_path / "d.jsonl", records())
        assert _fit(tmp_path, data, "--encoder", "hashing-256", strong=WEAK, weak=STRONG) == 0
        assert (
            f"warning: {WEAK} does not beat {STRONG} on the fitted prompts (0.5000 vs 1.0000): the router sends the"
            " prompts it finds hard to a model that is no better\n"
        ) in capsys.readouterr().err
        assert _fit(tmp_path, data, "--encoder", "hashing-256") == 0
        assert "warning" not in capsys.readouterr().err


class TestScoreOutput:
    def test_two_writers_to_one_out_do_not_write_into_one_file(self, tmp_path: Path) -> None:
        """Two score runs into one --out, the second starting while the first writes and ending
        first: each writes its own file and both succeed, --out holding the last to finish whole
        (both wrote one fixed partial file: the first to finish moved it, with the other's rows
        still coming into it, into place, and the other failed "no such file")."""
        out = tmp_path / "scores.jsonl"
        first_started, second_done = threading.Event(), threading.Event()
        results: dict[str, object] = {}

        def rows(tag: str, n: int) -> Iterator[dict[str, object]]:
            for i in range(n):
                yield {"source": tag, "id": f"{tag}-{i}", "score": 0.5}
                if tag == "A" and i == 0:
                    first_started.set()
                    assert second_done.wait(30)

        def write(tag: str, n: int) -> None:
            try:
                results[tag] = offline._write_jsonl(out, rows(tag, n))
            except OSError as exc:
                results[tag] = exc
            finally:
                if tag == "B":
                    second_done.set()

        a = threading.Thread(target=write, args=("A", 50))
        a.start()
        assert first_started.wait(30)
        write("B", 20)
        a.join(30)
        assert results == {"A": 50, "B": 20}
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["id"] for line in lines] == [f"A-{i}" for i in range(50)]
        assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.jsonl"]

    def test_a_symlinked_out_has_the_file_it_names_written(self, tmp_path: Path) -> None:
        """--out a symlink: score writes the file it names and keeps the link, as fit does (the
        link was replaced by a file, and the file it named kept its stale scores)."""
        data = write_jsonl(tmp_path / "d.jsonl", records())
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(tmp_path / "r")
        (tmp_path / "real").mkdir()
        target = tmp_path / "real" / "scores.jsonl"
        target.write_text('{"old": true}\n')
        link = tmp_path / "latest.jsonl"
        link.symlink_to(target)
        assert run("score", "--router", str(tmp_path / "r"), "--data", str(data), "--out", str(link)) == 0
        assert link.is_symlink()
        assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [r.id for r in records()]
        assert sorted(path.name for path in (tmp_path / "real").iterdir()) == ["scores.jsonl"]

    def test_a_fifo_out_is_written_into_and_kept(self, tmp_path: Path) -> None:
        """--out a FIFO (and a symlink to one): score writes its rows into it, for the reader
        at its other end, and the FIFO stays a FIFO, the link a link (a file renamed over the
        FIFO replaced it: the reader got nothing, as --out /dev/null as root replaced the device)."""
        data = write_jsonl(tmp_path / "d.jsonl", records())
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(tmp_path / "r")
        fifo = tmp_path / "scores.fifo"
        os.mkfifo(fifo)
        link = tmp_path / "link.jsonl"
        link.symlink_to(fifo)
        for out in (fifo, link):
            # Opened for reading first (without waiting for a writer), so score's open does not wait.
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                assert run("score", "--router", str(tmp_path / "r"), "--data", str(data), "--out", str(out)) == 0
                received = _read_all(reader)
            finally:
                os.close(reader)
            assert [json.loads(line)["id"] for line in received.splitlines()] == [r.id for r in records()]
            assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert link.is_symlink()
        assert sorted(path.name for path in tmp_path.iterdir()) == ["d.jsonl", "link.jsonl", "r", "scores.fifo"]

    def test_an_out_naming_a_pipe_through_proc_is_written_into(self, tmp_path: Path) -> None:
        """--out /proc/self/fd/N of a pipe (what /dev/stdout is when stdout is a pipe): score and
        classify write into the pipe (both failed "No such file or directory": the link names
        "pipe:[N]", no file)."""
        data = write_jsonl(tmp_path / "d.jsonl", records())
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(tmp_path / "r")
        for command in (("score", "--router", str(tmp_path / "r")), ("classify",)):
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            try:
                assert run(*command, "--data", str(data), "--out", f"/proc/self/fd/{write_end}") == 0
                os.close(write_end)
                received = _read_all(read_end)
            finally:
                os.close(read_end)
                with contextlib.suppress(OSError):
                    os.close(write_end)
            assert [json.loads(line)["id"] for line in received.splitlines()] == [r.id for r in records()]


def _read_all(fd: int) -> str:
    """What a non-blocking pipe or FIFO ``fd`` holds, up to its end (no writer) or what is there."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


# Runs the command line in a process whose files may not grow past LIMIT bytes (what a full disk
# does to a write: an OSError part way), with SIGXFSZ ignored so that the write fails, not the process.
_SMALL_FILES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from routesvc.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _run_with_small_files(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SMALL_FILES, *argv], capture_output=True, text=True, timeout=120, check=False
    )


class TestEvalPlot:
    def _eval(self, tmp_path: Path, *more: str) -> int:
        data = write_jsonl(tmp_path / "d.jsonl", records())
        if not (tmp_path / "r").exists():
            fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(tmp_path / "r")
        argv = ("eval", "--router", str(tmp_path / "r"), "--data", str(data), "--strong", STRONG, "--weak", WEAK)
        return run(*argv, *more)

    @pytest.mark.parametrize(
        ("name", "has"),
        [("curve.txt", "ends in .txt, not an image format matplotlib writes"), ("curve", "has no extension")],
    )
    def test_a_plot_name_whose_extension_is_no_image_format_is_refused_before_the_work(
        self, name: str, has: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--plot curve.txt: exit 2 with one line saying why, before reading the data (it scored
        every prompt, then matplotlib's ValueError was a traceback, exit 1, the metrics lost);
        --plot curve: refused too (it wrote curve.png, a file not asked for)."""
        assert self._eval(tmp_path, "--plot", str(tmp_path / name)) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"error: --plot {tmp_path / name}: the file name {has}; the image format is")
        assert len(captured.err.splitlines()) == 1  # nothing read: no per-file line
        assert ".png, or one of .avif" in captured.err
        assert sorted(path.name for path in tmp_path.iterdir()) == ["d.jsonl", "r"]

    def test_the_plot_is_written_in_the_format_of_its_name(self, tmp_path: Path) -> None:
        """--plot curve.svg writes an SVG there (the help said PNG)."""
        assert self._eval(tmp_path, "--plot", str(tmp_path / "curve.svg")) == 0
        assert b"<svg" in (tmp_path / "curve.svg").read_bytes()[:1000]

    def test_a_plot_that_cannot_be_written_names_it_after_printing_the_metrics(self, tmp_path: Path) -> None:
        """Writing the plot fails part way (the process may write files of only 4 KB): exit 2, the
        metrics are on stdout, and the error names the plot (stdout was empty, and a full disk's
        error named no file)."""
        data = write_jsonl(tmp_path / "d.jsonl", records())
        fit_router(records(), STRONG, WEAK, HashingEncoder(32)).save(tmp_path / "r")
        plot = tmp_path / "curve.png"
        argv = ("eval", "--router", str(tmp_path / "r"), "--data", str(data), "--strong", STRONG, "--weak", WEAK)
        done = _run_with_small_files(*argv, "--plot", str(plot), "--json")
        assert done.returncode == 2, done.stderr
        assert json.loads(done.stdout)["prompts"] == 80
        assert done.stderr.splitlines()[-1] == f"error: {plot}: File too large"

    def test_a_router_that_cannot_be_written_is_named(self, tmp_path: Path) -> None:
        """fit whose router.json cannot be written whole: exit 2 naming --out (the error named no
        file), and no folder left beside it."""
        data = write_jsonl(tmp_path / "d.jsonl", records())
        out = tmp_path / "router"
        argv = ("fit", "--data", str(data), "--strong", STRONG, "--weak", WEAK, "--out", str(out))
        done = _run_with_small_files(*argv, "--encoder", "hashing-256", "--kind-weight", "0")
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines()[-1] == f"error: {out}: File too large"
        assert sorted(path.name for path in tmp_path.iterdir()) == ["d.jsonl"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/routing")
class TestOnSharedData:
    def test_routerbench_pair_is_found_and_beats_random(self) -> None:
        """Fitted on 600 RouterBench rows, a router ranks 300 unseen rows of the same tasks above random."""
        data = read_outcomes(SHARED / "routerbench_train.jsonl")
        rng = np.random.default_rng(0)
        order = rng.permutation(len(data))
        train = [data[i] for i in order[:600]]
        test = [data[i] for i in order[600:900]]
        strong, weak = "gpt-4-1106-preview", "mixtral-8x7b-instruct"
        router = fit_router(train, strong, weak, HashingEncoder(256))
        assert [u.kind for u in router.usage] == ["pair"]
        kept = [r for r in test if r.has_pair(strong, weak)]
        scores = router.scores([r.prompt for r in kept])
        report = evaluate_scores(scores, [r.outcomes[strong] for r in kept], [r.outcomes[weak] for r in kept])
        assert report.apgr > 0.5
