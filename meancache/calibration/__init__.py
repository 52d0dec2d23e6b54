"""Calibration: stability costs measured on full-compute trajectories (:mod:`~meancache.calibration.costs`) and
the per-user store of calibrations made on first use (:mod:`~meancache.calibration.store`), and validated
selection by replaying candidate schedules on a recorded full run (:mod:`~meancache.calibration.replay`).

It replays the runtime estimator (:mod:`meancache.method`) over each interval, so it sits above ``method/``;
``schedule/`` (data, presets, PSSP) sits below both.
"""

from meancache.calibration.costs import (
    AGGREGATES,
    CANDIDATE_GAMMAS,
    COST_KINDS,
    Calibration,
    StabilityCostAccumulator,
    calibrate,
)
from meancache.calibration.replay import replay_error, replay_estimator_error, select_by_replay
from meancache.calibration.store import CalibrationStore, calibration_store, combine_calibrations

__all__ = [
    "AGGREGATES",
    "CANDIDATE_GAMMAS",
    "COST_KINDS",
    "Calibration",
    "CalibrationStore",
    "StabilityCostAccumulator",
    "calibrate",
    "calibration_store",
    "combine_calibrations",
    "replay_error",
    "replay_estimator_error",
    "select_by_replay",
]
