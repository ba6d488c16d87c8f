"""Builds the configured chain of routing stages and runs it."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from routesvc import telemetry
from routesvc.catalog import Catalog
from routesvc.config import RoutingConfig, RulesStageConfig, StageConfig
from routesvc.errors import ConfigError
from routesvc.providers.base import Provider
from routesvc.strategies import classifier, embedding, llm_classifier
from routesvc.strategies.base import NextStage, RoutingInput, Strategy, Verdict
from routesvc.strategies.classifier import ClassifierStageConfig
from routesvc.strategies.default import DefaultStrategy
from routesvc.strategies.embedding import EmbeddingStage
from routesvc.strategies.llm_classifier import LLMClassifierStage
from routesvc.strategies.rules import RulesStrategy


class Policy:
    """The stages in order, ending with the default stage."""

    def __init__(self, stages: Sequence[Strategy]) -> None:
        self._stages = tuple(stages)

    @classmethod
    def from_config(
        cls,
        config: RoutingConfig,
        *,
        catalog: Catalog | None = None,
        providers: Mapping[str, Provider] | None = None,
        base_dir: Path | None = None,
        source: str = "",
        cap_feedback_at_open: bool = True,
        previous: Policy | None = None,
    ) -> Policy:
        """The policy described by ``config``; relative paths in stages are read from ``base_dir``
        (the config file's folder). A stage that fails to build closes the feedback stores the
        stages before it opened (a reload retries a rejected version at every poll); its error
        names ``source`` (the config file) and the stage (``routing.stages[N]``).
        ``cap_feedback_at_open`` False leaves the examples past a stage's
        ``feedback_max_examples`` in its file until the stage's ``apply_example_cap`` (a reload's
        policy: a version it rejects must delete nothing). An LLM classifier stage takes over the
        labels of the one in ``previous`` (the policy a reload replaces) that asks its model the
        same way (``llm_classifier.LLMClassifierStage.keep_labels_of``)."""
        stages: list[Strategy] = []
        try:
            feedback_files: dict[Path, int] = {}  # each embedding stage's feedback_db, resolved: its stage
            for index, stage in enumerate(config.stages):
                try:
                    stages.append(
                        cls._build_stage(
                            stage,
                            index,
                            feedback_files,
                            catalog=catalog,
                            providers=providers,
                            base_dir=base_dir,
                            cap_feedback_at_open=cap_feedback_at_open,
                            previous=previous._stages if previous is not None else (),
                        )
                    )
                except ConfigError as exc:
                    raise _at_stage(exc, index, stage.kind, source) from exc
        except BaseException:
            cls(stages).close()
            raise
        stages.append(DefaultStrategy(config.default_model))
        return cls(stages)

    @staticmethod
    def _build_stage(
        stage: StageConfig,
        index: int,
        feedback_files: dict[Path, int],
        *,
        catalog: Catalog | None,
        providers: Mapping[str, Provider] | None,
        base_dir: Path | None,
        cap_feedback_at_open: bool,
        previous: Sequence[Strategy],
    ) -> Strategy:
        """The stage ``stage`` (``routing.stages[index]``) describes."""
        if isinstance(stage, RulesStageConfig):
            return RulesStrategy.from_config(stage)
        if isinstance(stage, ClassifierStageConfig):
            resolved = stage.model_copy(update={"examples": _resolve(stage.examples, base_dir)})
            if resolved.method == "local":
                return _local_classifier(resolved)
            built = llm_classifier.build(resolved, catalog=catalog, provider_for=dict(providers or {}).__getitem__)
            built.keep_labels_of(previous)
            return built
        if catalog is None:
            raise ConfigError("the embedding stage needs the catalog")
        resolved_embedding = stage.model_copy(
            update={
                "router": _resolve(stage.router, base_dir),
                "feedback_db": _resolve(stage.feedback_db, base_dir),
            }
        )
        if resolved_embedding.feedback_db is not None:
            # The config checked the paths as written; here they are resolved against the
            # config's folder and links (``a.db`` and ``/abs/a.db`` may be one file).
            path = resolved_embedding.feedback_db.resolve()
            if feedback_files.setdefault(path, index) != index:
                raise ConfigError(
                    f"embedding.feedback_db: {str(stage.feedback_db)!r} is routing.stages[{feedback_files[path]}]'s"
                    " feedback_db too; each embedding stage needs its own file"
                )
        return embedding.build(resolved_embedding, catalog=catalog, cap_at_open=cap_feedback_at_open)

    @property
    def learning_stages(self) -> tuple[EmbeddingStage, ...]:
        """The stages that learn from feedback on their decisions."""
        return tuple(stage for stage in self._stages if isinstance(stage, EmbeddingStage))

    @property
    def pays_to_decide(self) -> bool:
        """Whether a stage may call a provider to decide (an LLM classifier)."""
        return any(isinstance(stage, LLMClassifierStage) for stage in self._stages)

    def may_batch(self, realtime: bool) -> bool:
        """Whether the policy may decide batch mode for a request whose ``realtime`` is this (a
        rules stage has a rule setting it that does not require the other value)."""
        return any(stage.may_batch(realtime) for stage in self._stages if isinstance(stage, RulesStrategy))

    def close(self) -> None:
        """Close the learning stages' feedback stores."""
        for stage in self.learning_stages:
            if stage.feedback is not None:
                stage.feedback.close()

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages' names, in order."""
        return tuple(stage.name for stage in self._stages)

    async def decide(self, routing_input: RoutingInput) -> Verdict:
        """Run the chain from the first stage."""
        return await self._run(0, routing_input)

    async def _run(self, index: int, routing_input: RoutingInput) -> Verdict:
        stage = self._stages[index]
        downstream = 0.0  # time spent in later stages, so each stage reports only its own
        if index + 1 < len(self._stages):

            async def next_stage(updated: RoutingInput, /) -> Verdict:
                nonlocal downstream
                started = time.perf_counter()
                try:
                    return await self._run(index + 1, updated)
                finally:
                    downstream += time.perf_counter() - started

        else:

            async def next_stage(updated: RoutingInput, /) -> Verdict:
                raise AssertionError("the default stage never calls next")  # pragma: no cover

        chain: NextStage = next_stage
        started = time.perf_counter()
        try:
            return await stage.decide(routing_input, chain)
        finally:
            telemetry.record_stage_latency(stage.name, time.perf_counter() - started - downstream)


def _at_stage(error: ConfigError, index: int, kind: str, source: str) -> ConfigError:
    """``error``, raised building ``routing.stages[index]`` (of ``kind``), as the config's other
    errors read: ``my.yaml: routing.stages[0].model: ...`` for a field the stage names
    (``classifier.model: ...``), ``my.yaml: routing.stages[0]: ...`` otherwise."""
    where = f"routing.stages[{index}]"
    message = error.message
    # A field of the stage (``classifier.model``) becomes its place in the file.
    message = where + message[len(kind) :] if message.startswith(f"{kind}.") else f"{where}: {message}"
    return ConfigError(f"{source}: {message}" if source else message)


def _resolve(path: Path | None, base_dir: Path | None) -> Path | None:
    if path is None or path.is_absolute() or base_dir is None:
        return path
    return base_dir / path


@functools.lru_cache(maxsize=8)
def _local_classifier(config: ClassifierStageConfig) -> Strategy:
    # Encoding the examples takes a tenth of a second; a reload or a second server with the same
    # stage reuses the immutable classifier.
    return classifier.build(config)
