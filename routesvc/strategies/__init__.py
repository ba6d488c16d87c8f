"""Routing strategies: each stage of a policy in one module, behind ``Strategy``."""

from routesvc.strategies.base import NextStage, RoutingInput, Strategy, Verdict

__all__ = ["NextStage", "RoutingInput", "Strategy", "Verdict"]
