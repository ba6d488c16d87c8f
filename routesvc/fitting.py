"""Fitting a router from routing-outcome data, and scoring prompts with the fitted router.

**Labels.** For each prompt the label is how much the strong model beats the weak one:
``outcome[strong] - outcome[weak]``. Model ids are matched exactly, then by a loose alias
(lower case, no ``org/`` prefix, no ``_variant`` suffix, no trailing ``-vX.Y``), so
``Mixtral-8x7B-Instruct-v0.1`` stands for ``mixtral-8x7b-instruct``. A file that lacks the
pair still teaches difficulty: its label is its strongest model's score minus the mean of its
other models (a *proxy gap*), with a lower weight (``proxy_weight``). ``routesvc fit`` needs at
least one file with the pair (``check_pair``).

**Two parts of the score.** Held-out data sets are usually one task, where only the ranking
*within* the task matters; mixed traffic also needs the level *between* tasks. So:

- a *within-task* ridge regression on [embedding, lexical features] learns the label minus its
  task's mean (so it cannot lean on which task a prompt comes from, which does not transfer);
- a *between-task prior*: the mean task-level label of the ``k`` nearest training prompts.

**Kind prior.** Prompts the shipped task classifier labels as one of ``strong_kinds`` (code
generation, multi-step reasoning: the kinds the default rule policy sends to its strong model)
get ``kind_weight`` standard deviations of the training scores added. It is a prior, not learned
from the outcomes: between data sets the kinds' gaps disagree (AlpacaEval's judge preference puts
code *lowest*), so no fit on them can recover it; on the mixed-kind files that hold kinds out
(arena chat, LLMRouter's tasks pooled) it ranks kinds the way their outcomes do (see
docs/routing-quality.md).

``score = within + prior_weight * prior + kind``, then mapped through the training scores'
quantiles to [0, 1] (a score of 0.7 means "harder than 70% of the training prompts").

**Artifact** (``--out DIR``): ``router.json`` (pair, encoder, weights, quantiles, how each file
was used) and ``library.npz`` (training embeddings as float16 and their task-level labels). No
prompt text is stored.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routesvc.encoders import Encoder, EncoderError, Vectors, load_encoder
from routesvc.errors import RouteSvcError
from routesvc.features import FEATURE_NAMES, bounded, lexical_matrix
from routesvc.outcomes import OutcomeRecord
from routesvc.ridge import RidgeModel
from routesvc.strategies.classifier import shipped_classifier

ARTIFACT_VERSION = 2
FloatArray = npt.NDArray[np.float64]
Progress = Callable[[Iterable[int], int, str], Iterable[int]]
# The task kind of each text (already ``bounded``): the shipped task classifier unless given.
Labeller = Callable[[Sequence[str]], list[str]]
STRONG_KINDS = ("code_generation", "multi_step_reasoning")
_SPREAD_SAMPLE = 2000
_PRIOR_ROWS = 512  # embeddings scored against the library at once (``FittedRouter.prior``)


class FitError(RouteSvcError):
    """A router cannot be fitted or loaded (no usable data, bad artifact)."""

    reason = "FIT_FAILED"


def model_alias(model: str) -> str:
    """The loose form used to match model ids across data sets."""
    name = model.rsplit("/", 1)[-1].split("_", 1)[0].lower()
    return re.sub(r"-v\d+(?:\.\d+)*$", "", name)


COMMON_SHARE = 0.9
"""A model evaluated on at least this share of a file's prompts is one of the file's *common*
models: they give its difficulty term, its proxy label, and are preferred when a name matches."""


def common_models(counts: Mapping[str, int], prompts: int) -> list[str]:
    """The models of a file of ``prompts`` prompts, from how many of them each model was evaluated on."""
    return [model for model, count in counts.items() if count >= COMMON_SHARE * prompts]


def resolve_model(model: str, available: Iterable[str]) -> str | None:
    """``model`` itself if available, else the one available id with the same alias, else None."""
    matches = model_matches(model, available)
    return matches[0] if len(matches) == 1 else None


def model_version(model: str) -> str:
    """The version tail ``model_alias`` drops (``v0.2`` of ``Mistral-7B-Instruct-v0.2``), or ""."""
    name = model.rsplit("/", 1)[-1].split("_", 1)[0].lower()
    found = re.search(r"-(v\d+(?:\.\d+)*)$", name)
    return found.group(1) if found else ""


def model_matches(model: str, available: Iterable[str]) -> list[str]:
    """``[model]`` if available, else every available id with the same alias (sorted), but not one
    of another version: ``Mistral-7B-Instruct-v0.2`` matches ``mistral-7b-instruct``, not ``...-v0.1``."""
    names = list(available)
    if model in names:
        return [model]
    alias, version = model_alias(model), model_version(model)

    def same(name: str) -> bool:
        other = model_version(name)
        return model_alias(name) == alias and (not version or not other or version == other)

    return sorted(name for name in names if same(name))


@dataclass(frozen=True, slots=True)
class ModelMatch:
    """What a requested model name stands for in one file: ``name``, or None with the
    ``candidates`` when two or more of its models match by loose alias (ambiguous)."""

    name: str | None
    candidates: tuple[str, ...] = ()

    def note(self, role: str, model: str) -> str:
        """Why the file is taken not to have the model ("" unless ambiguous)."""
        if not self.candidates:
            return ""
        names = ", ".join(map(repr, self.candidates))
        return f"the {role} model {model!r} matches {names} here by loose alias: taken as absent"


def find_model(model: str, counts: Mapping[str, int], prompts: int) -> ModelMatch:
    """``model``'s name in a file whose models were evaluated on ``counts`` of its ``prompts``
    prompts: the exact id wherever it is, else the alias match among the file's common models,
    else among all of them (a model evaluated on only some prompts). Two alias matches are no
    match: the file is taken not to have the model, and the match names them (``candidates``)."""
    if model in counts:
        return ModelMatch(model)
    for names in (common_models(counts, prompts), list(counts)):
        matches = model_matches(model, names)
        if len(matches) > 1:
            return ModelMatch(None, tuple(matches))
        if matches:
            return ModelMatch(matches[0])
    return ModelMatch(None)


@dataclass(frozen=True, slots=True)
class FitSettings:
    """The knobs of ``fit_router`` (defaults chosen by leave-one-task-out CV; see docs)."""

    alpha: float = 300.0
    neighbours: int = 32
    prior_weight: float = 1.0
    proxy_weight: float = 0.5
    difficulty_weight: float = 1.0
    calibrate_proxy: bool = False
    use_embedding: bool = True
    use_lexical: bool = True
    kind_weight: float = 3.0
    strong_kinds: tuple[str, ...] = STRONG_KINDS


@dataclass(frozen=True, slots=True)
class FileUsage:
    """How one source file was used by ``fit``."""

    source: str
    prompts: int
    strong: str
    weak: str
    kind: str  # "pair", "proxy" or "skipped"
    has_strong: bool = False  # the requested strong model is evaluated on some of the file's prompts
    has_weak: bool = False
    labelled: int = -1  # prompts given a label (-1: all of them)
    reason: str = ""  # why a skipped file was skipped
    rule: str = ""  # which rule made it a pair or proxy file, with how many prompts have the pair
    note: str = ""  # a requested name that matched two of its models by loose alias (taken as absent)

    def describe(self) -> str:
        """One line for the fit log (and router.json)."""
        if self.kind == "skipped":
            line = f"{self.source}: {self.prompts} prompts, skipped ({self.reason})"
        else:
            some = "" if self.labelled in (-1, self.prompts) else f"{self.labelled} of "
            line = f"{self.source}: {some}{self.prompts} prompts, {self.kind} label {self.strong} - {self.weak}"
            line += f" ({self.rule})" if self.rule else ""
        return f"{line}; {self.note}" if self.note else line


@dataclass(frozen=True, slots=True)
class Labels:
    """Per-prompt label, weight and task, and how each file was used."""

    gap: FloatArray
    difficulty: FloatArray
    weight: FloatArray
    task: list[str]
    usage: list[FileUsage]


def label_records(
    records: Sequence[OutcomeRecord],
    strong: str,
    weak: str,
    proxy_weight: float = 0.5,
    calibrate_proxy: bool = True,
) -> Labels:
    """The strong-minus-weak label of every record (proxy gap where the pair is missing).

    Each file is used by the first of these rules that applies (``FileUsage.rule`` says which):

    - a *pair file* has both models of the pair (matched as ``find_model`` matches them) on
      half or more of its prompts, or both among its common models: those prompts are labelled
      with the pair; its other prompts are not used;
    - else a *proxy file* has two or more common models: every prompt is labelled with its
      best common model (the requested strong model when it is a common one; never the weak
      one) minus the weak model where the weak model is a common one, else minus the mean of
      its other common models. A pair on a few prompts does not make it a pair file: its
      proxy labels on every prompt teach more than the pair on those few;
    - else its prompts with both models of the pair, if any, are labelled with the pair;
    - else it is skipped, and its ``FileUsage`` says why.

    A name that matches two models of a file by loose alias is taken as absent there (its
    ``FileUsage.note`` names them).

    With ``calibrate_proxy`` each proxy file's labels are moved to the mean and spread of the
    pair-labelled files, so that task levels from different files are comparable.
    """
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_source[record.source].append(i)
    gap = np.zeros(len(records))
    difficulty = np.zeros(len(records))
    weight = np.zeros(len(records))
    usage: list[FileUsage] = []
    for source, rows in by_source.items():
        counts: dict[str, int] = defaultdict(int)
        totals: dict[str, float] = defaultdict(float)
        for i in rows:
            for model, score in records[i].outcomes.items():
                counts[model] += 1
                totals[model] += score
        common = common_models(counts, len(rows))
        strong_match, weak_match = find_model(strong, counts, len(rows)), find_model(weak, counts, len(rows))
        s, w = strong_match.name, weak_match.name
        note = "; ".join(filter(None, (strong_match.note("strong", strong), weak_match.note("weak", weak))))
        paired = [i for i in rows if s is not None and w is not None and records[i].has_pair(s, w)]
        on = f"the pair on {len(paired)} of {len(rows)} prompts"
        if paired and ((s in common and w in common) or 2 * len(paired) >= len(rows)):
            rule = f"pair file: {on}"
        elif len(common) >= 2:
            rule = f"proxy file: {on}, under half" if paired else "proxy file: no prompt has the pair"
            paired = []
        elif paired:
            many = f"{len(common)} model{'' if len(common) == 1 else 's'}"
            rule = f"{on}, under half, and {many} on 90% or more of its prompts, where a proxy label needs two"
        else:
            rule = ""
        # The difficulty term is the mean over the file's common models, the same on every row;
        # a file whose only usable rows are the pair's (each model missing on some) uses the pair.
        basis = [s, w] if paired and s is not None and w is not None and len(common) < 2 else common
        for i in rows:
            outcomes = records[i].outcomes
            scores = [outcomes[m] for m in basis if m in outcomes] or list(outcomes.values())
            difficulty[i] = 1.0 - float(np.mean(scores)) if scores else 0.0
        has = (s is not None, w is not None)
        if paired and s is not None and w is not None:
            for i in paired:
                outcomes = records[i].outcomes
                gap[i], weight[i] = outcomes[s] - outcomes[w], 1.0
            usage.append(FileUsage(source, len(rows), s, w, "pair", *has, len(paired), rule=rule, note=note))
            continue
        if len(common) < 2:
            why = "no prompt has outcomes for both models of the pair"
            many = f"{len(common)} model{'' if len(common) == 1 else 's'}"
            reason = f"{why}, and {many} evaluated on 90% or more of its prompts, where a proxy label needs two"
            usage.append(FileUsage(source, len(rows), "", "", "skipped", *has, reason=reason, note=note))
            continue
        # Among the common models only: a strong model evaluated on a few prompts would leave
        # the others unlabelled. Never the weak one: the weak model minus itself is a gap of 0
        # on every prompt, a confident wrong level, not a proxy.
        base = w if w in common else None
        top = s if s in common else max((m for m in common if m != base), key=lambda m: totals[m] / counts[m])
        labelled = 0
        for i in rows:
            outcomes = records[i].outcomes
            others = [outcomes[m] for m in common if m != top and m in outcomes]
            if top not in outcomes or not others:
                continue
            baseline = outcomes[base] if base is not None and base in outcomes else float(np.mean(others))
            gap[i], weight[i] = outcomes[top] - baseline, proxy_weight
            labelled += 1
        baseline_name = base or "mean of the others"
        usage.append(FileUsage(source, len(rows), top, baseline_name, "proxy", *has, labelled, rule=rule, note=note))
    if calibrate_proxy:
        _calibrate_proxies(records, gap, weight, usage)
    tasks = [f"{record.source}:{record.task}" for record in records]
    return Labels(gap=gap, difficulty=difficulty, weight=weight, task=tasks, usage=usage)


def _some(names: Sequence[str], shown: int = 4) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def check_pair(usage: Sequence[FileUsage], strong: str, weak: str) -> None:
    """Raise ``FitError`` unless at least one labelled file has both models of the pair.

    Files without the pair teach difficulty as proxies beside a file that has it; with no such
    file the router would learn some other pair's gap under this pair's name. The message names
    the model that no file has (or, when each is in some file, where each one is).
    """
    if not usage or any(u.kind == "pair" for u in usage):
        return
    files = [u.source for u in usage]
    with_strong = [u.source for u in usage if u.has_strong]
    with_weak = [u.source for u in usage if u.has_weak]
    missing = [
        f"the {role} model {model!r}"
        for role, model, found in (("strong", strong, with_strong), ("weak", weak, with_weak))
        if not found
    ]
    # A name ambiguous in a file is taken as absent there: say so, it may be why no file has the pair.
    notes = "".join(f"; in {u.source} {u.note}" for u in usage if u.note)
    if missing:
        raise FitError(
            f"no data file has {' or '.join(missing)} (read {len(files)}: {_some(files)}; "
            f"models match by id or loose alias){notes}"
        )
    raise FitError(
        f"no prompt has outcomes for both {strong!r} and {weak!r} ({strong!r} in {_some(with_strong)}, {weak!r} in "
        f"{_some(with_weak)}): at least one file needs prompts with the pair; files without it are then used as"
        f" proxies{notes}"
    )


def _calibrate_proxies(
    records: Sequence[OutcomeRecord], gap: FloatArray, weight: FloatArray, usage: Sequence[FileUsage]
) -> None:
    sources = np.array([record.source for record in records])
    pair_sources = [u.source for u in usage if u.kind == "pair"]
    pair_rows = np.isin(sources, pair_sources) & (weight > 0)
    if pair_rows.sum() < 2:
        return
    target_mean, target_std = float(gap[pair_rows].mean()), float(gap[pair_rows].std())
    for u in usage:
        if u.kind != "proxy":
            continue
        rows = (sources == u.source) & (weight > 0)
        spread = float(gap[rows].std()) if rows.any() else 0.0
        if spread > 1e-9:
            gap[rows] = (gap[rows] - gap[rows].mean()) / spread * target_std + target_mean


def task_means(values: FloatArray, weight: FloatArray, tasks: Sequence[str]) -> FloatArray:
    """Each row's weighted task mean of ``values``."""
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for value, w, task in zip(values, weight, tasks, strict=True):
        sums[task] += value * w
        weights[task] += w
    return np.array([sums[t] / weights[t] if weights[t] > 0 else 0.0 for t in tasks])


def _identity(items: Iterable[int], total: int, description: str) -> Iterable[int]:
    return items


@dataclass
class FittedRouter:
    """A fitted router: turns prompts into a calibrated preference for the strong model."""

    strong: str
    weak: str
    encoder: Encoder
    settings: FitSettings
    within: RidgeModel
    library: Vectors
    library_prior: FloatArray
    quantiles: FloatArray
    usage: list[FileUsage] = field(default_factory=list)
    kind_offset: float = 0.0  # added for a strong kind: kind_weight x the training scores' spread
    labeller: Labeller | None = None  # None: the shipped task classifier, built when first needed

    def features(self, texts: Sequence[str], embeddings: Vectors | None = None) -> FloatArray:
        """The within-task model's input rows."""
        parts: list[npt.NDArray[np.float32]] = []
        if self.settings.use_embedding:
            parts.append(self.encoder.encode(texts) if embeddings is None else embeddings)
        if self.settings.use_lexical:
            parts.append(lexical_matrix(texts))
        return np.hstack(parts).astype(np.float64) if parts else np.zeros((len(texts), 1))

    def raw(self, texts: Sequence[str], embeddings: Vectors, kinds: Sequence[str] | None = None) -> FloatArray:
        """Uncalibrated scores of ``texts`` (already ``bounded``) with their ``embeddings``: the
        within-task prediction plus the weighted neighbour prior plus the kind prior. ``kinds``
        (one task label per text) skips labelling them."""
        within = self.within.predict(self.features(texts, embeddings))[:, 0]
        return within + self.settings.prior_weight * self.prior(embeddings) + self.kind_prior(texts, kinds)

    def kind_prior(self, texts: Sequence[str], kinds: Sequence[str] | None = None) -> FloatArray:
        """``kind_offset`` for each text whose task kind is one of ``strong_kinds``, else 0."""
        if self.kind_offset == 0 or not texts:
            return np.zeros(len(texts))
        if kinds is None:
            kinds = self.label(texts)
        strong = np.array([kind in self.settings.strong_kinds for kind in kinds], dtype=np.float64)
        return self.kind_offset * strong

    def label(self, texts: Sequence[str]) -> list[str]:
        """The task kind of each text, from ``labeller`` (by default the shipped task classifier)."""
        if self.labeller is None:
            self.labeller = _shipped_labeller()
        return self.labeller(texts)

    def raw_scores(self, texts: Sequence[str], progress: Progress = _identity, chunk: int = 512) -> FloatArray:
        """Uncalibrated scores (``raw``), encoding the texts in chunks."""
        out = np.zeros(len(texts))
        for start in progress(range(0, len(texts), chunk), (len(texts) + chunk - 1) // chunk, "scoring"):
            batch = [bounded(text) for text in texts[start : start + chunk]]
            out[start : start + len(batch)] = self.raw(batch, self.encoder.encode(batch))
        return out

    def prior(self, embeddings: Vectors) -> FloatArray:
        """Mean task-level label of each embedding's nearest library prompts."""
        if len(self.library) == 0 or self.settings.prior_weight == 0:
            return np.zeros(len(embeddings))
        k = min(self.settings.neighbours, len(self.library))
        library = self.library.T.astype(np.float32)
        prior = np.empty(len(embeddings), dtype=np.float64)
        # By rows, so that memory stays that of _PRIOR_ROWS x the library (fit scores every
        # training prompt against the library: the whole matrix was 3 GB for 14,000 prompts).
        for start in range(0, len(embeddings), _PRIOR_ROWS):
            sims = embeddings[start : start + _PRIOR_ROWS].astype(np.float32) @ library
            nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            prior[start : start + _PRIOR_ROWS] = self.library_prior[nearest].mean(axis=1)
        return prior

    def calibrate(self, raw: FloatArray) -> FloatArray:
        """Raw scores as the share of training prompts scoring lower, in [0, 1]."""
        ranks = np.searchsorted(self.quantiles, raw, side="right")
        return np.clip(ranks / len(self.quantiles), 0.0, 1.0)

    def scores(self, texts: Sequence[str], progress: Progress = _identity) -> FloatArray:
        """Calibrated preference for the strong model, one per text, in [0, 1].

        A blank prompt scores 0: there is nothing for the strong model to do better.
        """
        calibrated = self.calibrate(self.raw_scores(texts, progress))
        blank = np.array([not text.strip() for text in texts], dtype=bool)
        calibrated[blank] = 0.0
        return calibrated

    def _mismatch(self, lexical: object) -> str:
        """What does not fit together in a loaded router ("" when all does): the library's width
        and the encoder's, the library and its priors, the within-task weights and the features
        they take (``lexical``: the feature names saved with them), the quantiles."""
        dim = int(self.encoder.encode([""]).shape[1])
        if self.library.ndim != 2 or (len(self.library) and self.library.shape[1] != dim):
            shape = self.library.shape
            return (
                f"library.npz holds embeddings of shape {shape}, the encoder {self.encoder.name!r} gives {dim} values"
            )
        if self.library_prior.shape != (len(self.library),):
            return f"library.npz holds {len(self.library)} embeddings and a prior of shape {self.library_prior.shape}"
        if self.settings.use_lexical and lexical != list(FEATURE_NAMES):
            # The weights are of the features named when it was fitted, in their order.
            saved = f"{len(lexical)} lexical features" if isinstance(lexical, list) else "no list of lexical features"
            return f"saved with {saved}, not the {len(FEATURE_NAMES)} this version computes: fit it again"
        # ``features`` gives one column of zeros when neither part is used.
        width = (dim if self.settings.use_embedding else 0) + (len(FEATURE_NAMES) if self.settings.use_lexical else 0)
        width = width or 1
        within = self.within
        shapes = (within.mean.shape, within.scale.shape, within.coef.shape, within.intercept.shape)
        if shapes != ((width,), (width,), (width, 1), (1,)):
            return f"the within-task weights have shapes {shapes}, the features {width} columns and the score one"
        arrays = (within.mean, within.scale, within.coef, within.intercept, self.library, self.library_prior)
        if not all(np.isfinite(array).all() for array in arrays) or not (within.scale > 0).all():
            return "the within-task weights or the library hold numbers that are not finite"
        quantiles = self.quantiles
        if quantiles.ndim != 1 or len(quantiles) == 0 or not np.isfinite(quantiles).all():
            return "quantiles must be a non-empty list of finite numbers"
        if (np.diff(quantiles) < 0).any():
            return "quantiles must be in increasing order"
        return ""

    def save(self, out: Path) -> None:
        """Write ``router.json`` and ``library.npz`` into folder ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "version": ARTIFACT_VERSION,
            "strong": self.strong,
            "weak": self.weak,
            "encoder": self.encoder.name,
            "settings": {name: getattr(self.settings, name) for name in self.settings.__dataclass_fields__},
            "lexical_features": list(FEATURE_NAMES),
            "within": self.within.to_dict(),
            "kind_offset": self.kind_offset,
            "quantiles": self.quantiles.tolist(),
            "files": [usage.describe() for usage in self.usage],
        }
        (out / "router.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        np.savez_compressed(out / "library.npz", embeddings=self.library.astype(np.float16), prior=self.library_prior)

    @classmethod
    def load(cls, folder: Path, encoder: Encoder | None = None, labeller: Labeller | None = None) -> FittedRouter:
        """Read a router written by ``save``; the encoder is rebuilt from its recorded name.

        A version 1 artifact (before the kind prior) loads without one, so it scores as it did.
        """
        meta, embeddings, prior = _read_artifact(folder)
        if not isinstance(meta, dict):
            raise FitError(f"{folder}: not a fitted router (router.json is not a JSON object)")
        version = meta.get("version")
        if isinstance(version, bool) or version not in (1, ARTIFACT_VERSION):
            raise FitError(f"{folder}: artifact version {version!r}, expected {ARTIFACT_VERSION}")
        try:
            if not isinstance(meta["encoder"], str):
                raise TypeError(f"encoder {meta['encoder']!r} is not an encoder name")
            chosen = encoder or load_encoder(meta["encoder"])
            if chosen.name != meta["encoder"]:
                raise FitError(f"{folder}: fitted with encoder {meta['encoder']!r}, given {chosen.name!r}")
            kind_offset = float(meta.get("kind_offset", 0.0))
            if not np.isfinite(kind_offset) or kind_offset < 0:
                raise ValueError(f"kind_offset {kind_offset!r} is not a finite number, 0 or more")
            if not isinstance(meta["strong"], str) or not isinstance(meta["weak"], str):
                raise TypeError("strong and weak must be model ids")
            router = cls(
                strong=meta["strong"],
                weak=meta["weak"],
                encoder=chosen,
                settings=_settings(meta["settings"]),
                within=RidgeModel.from_dict(meta["within"]),
                library=np.asarray(embeddings, dtype=np.float32),
                library_prior=np.asarray(prior, dtype=np.float64),
                quantiles=np.asarray(meta["quantiles"], dtype=np.float64),
                kind_offset=kind_offset,
            )
            problem = router._mismatch(meta.get("lexical_features"))
        except (KeyError, TypeError, ValueError, AttributeError, EncoderError) as exc:
            # AttributeError: a field of another JSON type than the code reading it takes.
            raise FitError(f"{folder}: not a fitted router ({type(exc).__name__}: {exc})") from exc
        if problem:
            raise FitError(f"{folder}: the router's parts do not fit together: {problem}")
        # Built now, not on the first prompt: a server loads the router at start.
        router.labeller = labeller or (_shipped_labeller() if kind_offset else None)
        return router


_READ_ATTEMPTS = 3


def _read_artifact(folder: Path) -> tuple[object, npt.NDArray[np.generic], npt.NDArray[np.generic]]:
    """``router.json`` (parsed) and ``library.npz``'s two arrays, both of one and the same folder.

    Both files are opened relative to the folder opened once: ``fit`` renames a new folder into
    place, and reading them by path, one after the other, could give one fit's weights with
    another's library should the swap land between the two reads. Should the folder opened be
    removed while it is read (the fit deleting the old one), the new one is read, whole; should
    there be no folder (a fit between its two renames), it is looked for again, as many times.
    """
    for attempt in range(1, _READ_ATTEMPTS + 1):
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and attempt < _READ_ATTEMPTS:
                time.sleep(0.05 * attempt)  # a fit between its two renames leaves no folder a moment
                continue
            raise FitError(f"{folder}: not a fitted router ({_kind(exc)}: {exc})") from exc
        try:
            with open(os.open("router.json", os.O_RDONLY, dir_fd=dir_fd), "rb") as handle:
                meta = json.loads(handle.read().decode("utf-8"))
            with open(os.open("library.npz", os.O_RDONLY, dir_fd=dir_fd), "rb") as handle, np.load(handle) as arrays:
                return meta, np.asarray(arrays["embeddings"]), np.asarray(arrays["prior"])
        except Exception as exc:  # any failure to read the two files is a damaged artifact
            # Only reading and parsing happens here, and a damaged file fails in many ways: a
            # router.json that is not JSON or UTF-8 (ValueError), a library.npz that is empty
            # (EOFError), truncated (BadZipFile), has a damaged member (zlib.error), an unsupported
            # or encrypted one (NotImplementedError, RuntimeError) or not those two arrays (KeyError).
            if attempt < _READ_ATTEMPTS and _replaced(folder, dir_fd):
                time.sleep(0.05 * attempt)  # a fit between its two renames leaves no folder a moment
                continue
            raise FitError(f"{folder}: not a fitted router ({_kind(exc)}: {exc})") from exc
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _replaced(folder: Path, dir_fd: int) -> bool:
    """Whether ``folder`` is no longer (or not now) the folder open as ``dir_fd``."""
    opened = os.fstat(dir_fd)
    try:
        now = os.stat(folder)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def _kind(exc: BaseException) -> str:
    """The exception's class name, with its module when the name alone says little (``zlib.error``)."""
    kind = type(exc)
    return kind.__name__ if kind.__name__[0].isupper() else f"{kind.__module__}.{kind.__name__}"


def _settings(saved: dict[str, object]) -> FitSettings:
    """``FitSettings`` from ``router.json`` (a version 1 file has no kind prior: weight 0)."""
    values = dict(saved)
    values.setdefault("kind_weight", 0.0)
    kinds = values.get("strong_kinds", STRONG_KINDS)
    values["strong_kinds"] = tuple(kinds) if isinstance(kinds, list | tuple) else STRONG_KINDS
    # What scoring reads (the rest only shaped the fit): refused here, not a NaN score later.
    neighbours = values.get("neighbours", 1)
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
        raise ValueError(f"settings.neighbours {neighbours!r} is not a whole number of at least 1")
    prior_weight = values.get("prior_weight", 0.0)
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, int | float) or not math.isfinite(prior_weight):
        raise ValueError(f"settings.prior_weight {prior_weight!r} is not a finite number")
    for name in ("use_embedding", "use_lexical"):
        if not isinstance(values.get(name, True), bool):
            raise ValueError(f"settings.{name} {values[name]!r} is not true or false")
    return FitSettings(**values)  # type: ignore[arg-type]


def _shipped_labeller() -> Labeller:
    """The shipped local task classifier (team-written examples, WordLlama) as a labeller."""
    classifier = shipped_classifier()
    return lambda texts: [prediction.task for prediction in classifier.predict_many(texts)]


def fit_router(
    records: Sequence[OutcomeRecord],
    strong: str,
    weak: str,
    encoder: Encoder,
    settings: FitSettings = FitSettings(),
    progress: Progress = _identity,
    embeddings: Vectors | None = None,
    calibrate: bool = True,
    require_pair: bool = False,
    labeller: Labeller | None = None,
) -> FittedRouter:
    """Fit a router for the pair from ``records``.

    ``embeddings`` (one row per record) skips encoding; ``calibrate=False`` skips the score
    quantiles (rankings are unchanged; used by cross-validation). ``require_pair`` (``routesvc
    fit`` sets it) raises ``FitError`` unless some file has both models (``check_pair``);
    without it a pair that no file has is fitted on proxy labels alone. ``labeller`` gives task
    kinds for the kind prior (default: the shipped task classifier).
    """
    labels = label_records(records, strong, weak, settings.proxy_weight, settings.calibrate_proxy)
    for usage in labels.usage:
        if usage.kind == "pair" and usage.strong == usage.weak:
            raise FitError(
                f"the strong model {strong!r} and the weak model {weak!r} are the same model in {usage.source}"
                f" ({usage.strong!r}; models match by id or loose alias): a router between them learns nothing"
            )
    if require_pair:
        check_pair(labels.usage, strong, weak)
    keep = np.flatnonzero(labels.weight > 0)
    if len(keep) == 0:
        why = "; ".join(u.describe() for u in labels.usage)
        raise FitError(f"no prompt can be labelled ({why})")
    texts = [bounded(records[int(i)].prompt) for i in keep]
    if embeddings is None:
        chunk = 512
        steps = progress(range(0, len(texts), chunk), -(-len(texts) // chunk), "embedding")
        parts = [encoder.encode(texts[start : start + chunk]) for start in steps]
        vectors = np.vstack(parts)
    else:
        vectors = embeddings[keep]
    gap, weight = labels.gap[keep], labels.weight[keep]
    tasks = [labels.task[int(i)] for i in keep]
    level = task_means(gap, weight, tasks)
    difficulty = labels.difficulty[keep]
    target = gap - level + settings.difficulty_weight * (difficulty - task_means(difficulty, weight, tasks))
    router = FittedRouter(
        strong=strong,
        weak=weak,
        encoder=encoder,
        settings=settings,
        within=RidgeModel(np.zeros(1), np.ones(1), np.zeros((1, 1)), np.zeros(1)),
        library=vectors,
        library_prior=level,
        quantiles=np.zeros(1),
        usage=labels.usage,
        labeller=labeller,
    )
    router.within = RidgeModel.fit(router.features(texts, vectors), target, settings.alpha, weight)
    # The kind prior's unit is the spread of the scores without it (a fixed number of standard
    # deviations, so it weighs the same against routers fitted on other data), estimated on a
    # fixed sample: the neighbour prior of every training prompt would cost a fit ~10 s more.
    sample = np.random.default_rng(0).permutation(len(texts))[:_SPREAD_SAMPLE]
    spread = float(router.raw([texts[i] for i in sample], vectors[sample]).std())
    router.kind_offset = settings.kind_weight * spread
    if not calibrate:
        return router
    kinds: list[str] | None = None
    if router.kind_offset:
        steps = progress(range(0, len(texts), 512), -(-len(texts) // 512), "labelling kinds")
        kinds = [kind for start in steps for kind in router.label(texts[start : start + 512])]
    router.quantiles = np.quantile(router.raw(texts, vectors, kinds), np.linspace(0, 1, 1001))
    return router
