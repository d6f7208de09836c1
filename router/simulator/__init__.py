"""Simulated upstreams (ModelScope API-Inference and Bailian) for tests, benchmarks and demos."""

from router.simulator.app import create_app, create_bailian_app, create_modelscope_app
from router.simulator.config import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    SimulatorConfig,
    default_simulator_config,
    load_simulator_config,
)
from router.simulator.faults import FAULT_KINDS, FaultRule, Faults, parse_rule
from router.simulator.server import Simulator, run_simulator
from router.simulator.state import SimState, quota_day

__all__ = [
    "FAULT_KINDS",
    "BailianConfig",
    "BailianKey",
    "FaultRule",
    "Faults",
    "ModelScopeConfig",
    "ModelScopeToken",
    "SimState",
    "Simulator",
    "SimulatorConfig",
    "create_app",
    "create_bailian_app",
    "create_modelscope_app",
    "default_simulator_config",
    "load_simulator_config",
    "parse_rule",
    "quota_day",
    "run_simulator",
]
