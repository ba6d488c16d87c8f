"""Builds the configured chain of routing stages and runs it."""

from __future__ import annotations

import time
from collections.abc import Sequence

from routesvc import telemetry
from routesvc.config import RoutingConfig, RulesStageConfig
from routesvc.strategies.base import NextStage, RoutingInput, Strategy, Verdict
from routesvc.strategies.default import DefaultStrategy
from routesvc.strategies.rules import RulesStrategy


class Policy:
    """The stages in order, ending with the default stage."""

    def __init__(self, stages: Sequence[Strategy]) -> None:
        self._stages = tuple(stages)

    @classmethod
    def from_config(cls, config: RoutingConfig) -> Policy:
        """The policy described by ``config``."""
        stages: list[Strategy] = []
        for stage in config.stages:
            if isinstance(stage, RulesStageConfig):
                stages.append(RulesStrategy.from_config(stage))
        stages.append(DefaultStrategy(config.default_model))
        return cls(stages)

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
