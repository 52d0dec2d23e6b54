"""Calibrate on first use: ``MeanCacheConfig(budget=B)`` on a model and settings with no known schedule.

Rules (one pipeline's :class:`FirstUseCalibration`, one generation's :class:`GenerationCalibration`):

* **Progressive**: the first generation of a key (:func:`~meancache.integrations.diffusers.key.calibration_key`)
  with nothing stored runs every step (an all-computed schedule: the uncached pipeline's output, bit for bit)
  while a :class:`~meancache.calibration.StabilityCostAccumulator` observes each step's latents and guided
  velocity (a batch is averaged in: the costs are element means). The generations after it run the budget with
  the schedule calibrated on it, and every ``FULL_RUN_EVERY``-th generation of the key (10) runs in full again
  to add a trajectory, until ``calibration_runs`` generations are observed; from then on the budget always runs.
  So a user's first ten generations hold one full generation, not ``calibration_runs``.
* When a calibrating generation completes, its costs are folded into the key's stored calibration (weighted by
  generations) and saved; an interrupted generation adds nothing.
* Each calibrating generation also records its run for replay (the latent before every step and the velocity it
  stepped with, :func:`~meancache.calibration.replay.replay_sample`'s elements of them in bfloat16 on the CPU: at
  most ``2 N x 32,768`` values), kept beside the calibration (:meth:`~meancache.calibration.CalibrationStore.runs`).
  Then **validated selection by replay** picks the schedule for the generation's budget, and the estimator it runs
  with, from the costs of every generation observed so far: each candidate of
  :meth:`~meancache.calibration.Calibration.candidate_schedules` (closed-loop PSSP over gamma 1.5/2/3, spans up
  to 3..5, gaps up to 6..8 and the shortest the budget can bridge, and four power-spaced schedules that keep steps 0
  and 1) is replayed under each estimator of
  :data:`~meancache.method.estimators.SELECTABLE` on every recorded run of the key, with no transformer call
  (:func:`~meancache.calibration.select_by_replay`), and the pair with the least replay error is stored in the
  calibration's metadata (``selected``, by budget; the estimator as the schedule's ``estimator`` metadata, which
  ``MeanCacheConfig`` follows unless it names one).
* The run's schedule is the selected one for its budget (:func:`first_use_schedule`). Another budget is selected
  the same way on the recorded runs when first asked for (:func:`select_for_budget`); a calibration with no
  recorded runs (made before they were kept, or whose runs file cannot be read) gives it the PSSP
  solution with closed-loop costs, gamma ``GAMMA`` (2), spans up to ``SOLVER_MAX_SPAN`` (3) and gaps up to
  ``SOLVER_GAP`` (6), or the shortest gap the budget can bridge (``ceil((N - 1) / (B - 1))``) when longer.
  Every schedule made from first-use costs, candidate or not, anchors no look-back at step 0
  (:meth:`~meancache.calibration.Calibration.without_step_0_anchor`).
  Measured: ``benchmarks/bench_first_use_calibration.py``, ``docs/schedule_study.md``.
* Costs are measured for gaps up to ``MAX_GAP`` (8) and spans up to ``MAX_SPAN`` (5). A budget below
  ``ceil((N - 1) / MAX_GAP) + 1`` cannot bridge the run; it is not calibrated (the uniform fallback runs, with a
  log message).
* Per pipeline, the schedule resolved for a key and budget is kept: a later generation with the same key reads
  no file and solves nothing (the key's weight fingerprint is cached too:
  :class:`~meancache.integrations.diffusers.key.WeightsFingerprint`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from meancache.calibration import (
    Calibration,
    CalibrationStore,
    StabilityCostAccumulator,
    combine_calibrations,
    select_by_replay,
)
from meancache.calibration.replay import replay_sample
from meancache.calibration.store import key_digest
from meancache.integrations.diffusers.guidance import observed_guidance
from meancache.integrations.diffusers.key import WeightsFingerprint, calibration_key
from meancache.method.estimators import ESTIMATOR_KEY
from meancache.schedule import Schedule
from meancache.schedule.pssp import solve_pssp

MAX_GAP = 8
MAX_SPAN = 5
FULL_RUN_EVERY = 10
"""While a key's calibration has fewer than ``calibration_runs`` generations, every ``FULL_RUN_EVERY``-th generation
of the key runs in full to add one (the others run the budget with the schedule calibrated so far)."""
GAMMA = 2.0
SOLVER_MAX_SPAN = 3
SOLVER_GAP = 6
TRAJECTORY_DTYPE = torch.bfloat16
"""The dtype calibrating generations record their runs in, for replay (measured at stop 20: the same picks as
float32 on both bundled image models)."""
CALL_PATTERN = "call_pattern"
"""Calibration metadata: per step of the calibrating generations, their transformer and ControlNet calls (what
guidance settings acting after the first step change; checked against later generations)."""
GENERATIONS = "calibration_generations"
"""Schedule metadata: how many generations the calibration it was solved from observed."""
SELECTED = "selected"
"""Calibration metadata: budget (as a string) -> the schedule validated selection picked for it."""

logger = logging.getLogger(__name__)


@dataclass
class FirstUseCalibration:
    """Calibrate-on-first-use settings for one pipeline, the keys already announced, and what was resolved per key:
    the transformer's weight fingerprint and the schedule for each (key digest, budget); and the warnings already
    given (a decline, a call pattern per calibration), each given once."""

    runs: int
    store: CalibrationStore
    announced: set[str] = field(default_factory=set)
    fingerprint: WeightsFingerprint = field(default_factory=WeightsFingerprint)
    schedules: dict[tuple[str, int], Schedule] = field(default_factory=dict)
    declined: bool = False
    pattern_warned: set[str] = field(default_factory=set)

    def for_generation(
        self, make_key: Callable[[], dict[str, Any] | None], device: torch.device
    ) -> GenerationCalibration:
        """One generation's view of the store, for a generation running on ``device`` (where it replays)."""
        return GenerationCalibration(self, make_key, device)

    def generation_key(
        self, pipe: Any, models: torch.nn.ModuleDict, checkpoint: str, sigmas: list[float],
        latents: torch.Tensor | None, calls: Sequence[dict[str, Any]], outputs: Sequence[Any], guided: torch.Tensor,
    ) -> dict[str, Any] | None:  # fmt: skip
        """The calibration key of a generation of ``pipe`` whose gated ``models`` ran on ``sigmas`` from
        ``latents``, its guidance part what the first step showed (:func:`observed_guidance`: ``calls`` the keyword
        arguments of its transformer calls, ``outputs`` what they returned, ``guided`` the velocity the scheduler
        received); None, with a warning once per pipeline (:meth:`decline`), when the sigmas do not fall or the
        guidance cannot be identified (two guidance settings would share a calibration)."""
        if any(later >= earlier for earlier, later in itertools.pairwise(sigmas)):
            # Stable Audio 3's audio-to-audio raises sigma after its first step; LongCat-AudioDiT counts 0 -> 1
            self.decline(
                pipe, "its sigmas are not strictly decreasing (noise to data), which calibration measures along"
            )
            return None
        observed = observed_guidance(pipe, calls, outputs, guided)
        if observed.unidentified is not None:
            self.decline(
                pipe,
                f"{observed.unidentified}, so the calibration could not be told apart from other guidance settings",
            )
            return None
        return calibration_key(pipe, self.fingerprint(models), checkpoint, sigmas, latents, calls, observed.settings)

    def decline(self, pipe: Any, reason: str) -> None:
        """Warn, once per pipeline, that its generations are not calibrated on first use, and why."""
        if not self.declined:
            self.declined = True
            logger.warning(
                "MeanCache: not calibrating %s on first use: %s. The budget runs evenly spaced steps with plain "
                "reuse; for MeanCache's estimate, pass a schedule for this model (MeanCacheConfig(schedule), e.g. "
                "from meancache calibrate).", type(pipe).__name__, reason,
            )  # fmt: skip

    def check_call_pattern(self, pipeline_name: str, schedule: Schedule, call_pattern: list[list[int]]) -> None:
        """Warn, once per calibration, when a generation that took a first-use calibration made other calls per step
        (``call_pattern``) than the generations that made it: a guidance setting acting only after the first step
        differs (Lumina 2's ``cfg_trunc_ratio``, SD3's skip-layer window, ControlNet ``control_guidance_start/end``),
        which the key, decided at the first step, cannot hold."""
        expected, digest = schedule.metadata.get(CALL_PATTERN), schedule.metadata.get("calibration_key")
        if expected is None or expected == call_pattern or digest in self.pattern_warned:
            return
        self.pattern_warned.add(digest)
        step = next(i for i, pair in enumerate(call_pattern) if i >= len(expected) or expected[i] != pair)
        logger.warning(
            "MeanCache: this generation of %s made %s transformer (and ControlNet) calls at step %d where the "
            "generations that calibrated its schedule (key %s) made %s: a guidance setting that acts after the "
            "first step differs from theirs (cfg_trunc_ratio, skip-layer guidance, control_guidance_start/end, "
            "...), so the schedule was calibrated for another trajectory. `meancache calibrations clear %s` "
            "recalibrates on the next generations; or pass a schedule.",
            pipeline_name, call_pattern[step], step, digest, expected[step] if step < len(expected) else "none",
            digest,
        )  # fmt: skip


@dataclass
class GenerationCalibration:
    """One generation's view of the store: the stored schedule, or this generation's calibration
    (:class:`meancache.schedule.defaults.CalibratedSchedules`). The key is computed when first needed (not
    when a schedule shipped with the model applies); a generation whose key cannot be made (``make_key`` returns
    None) neither uses nor makes a calibration."""

    owner: FirstUseCalibration
    make_key: Callable[[], dict[str, Any] | None] = field(repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the generation runs: recorded runs are replayed there."""
    accumulator: StabilityCostAccumulator | None = None
    """Set when this generation calibrates."""
    budget: int = 0
    """The budget this generation's calibration selects a schedule for."""
    trajectory: tuple[list[torch.Tensor], list[torch.Tensor]] | None = field(default=None, repr=False)
    """The sampled latents and velocities of every step (:func:`replay_sample`) a calibrating generation records."""
    started: float = 0.0

    @functools.cached_property
    def key(self) -> dict[str, Any] | None:
        return self.make_key()

    @functools.cached_property
    def digest(self) -> str:
        assert self.key is not None
        return key_digest(self.key)

    def stored(self, num_steps: int, budget: int) -> Schedule | None:
        """The schedule of the key's stored calibration for ``budget``; None when nothing is stored, or when the
        calibration is provisional (fewer than ``runs`` generations) and this generation is the
        ``FULL_RUN_EVERY``-th since the calibration last grew (counted by the store, so across processes too: one
        ``meancache generate`` is one generation), which then calibrates (:meth:`calibrating`)."""
        if self.key is None or not _bridgeable(num_steps, budget):
            return None
        owner = self.owner
        schedule = owner.schedules.get((self.digest, budget))
        if schedule is None:
            calibration = owner.store.load(self.key)
            if calibration is None or not calibration.trajectories:
                return None
            schedule = self._schedule(calibration, budget)
            owner.schedules[(self.digest, budget)] = schedule
        if schedule.metadata[GENERATIONS] < owner.runs:  # provisional: every FULL_RUN_EVERY-th generation calibrates
            served = owner.store.uses(self.key)
            if served + 1 >= FULL_RUN_EVERY:
                return None
            owner.store.set_uses(self.key, served + 1)
        return schedule

    def _schedule(self, calibration: Calibration, budget: int) -> Schedule:
        """:func:`first_use_schedule` with where it comes from in its metadata (``source``, the key's digest, and
        ``GENERATIONS``). A budget no calibrating generation selected for is selected now on the key's recorded runs
        (:func:`select_for_budget`; stored once the calibration is complete)."""
        if str(budget) not in _selected(calibration):
            runs = self._recorded_runs(calibration)
            if runs:
                complete = calibration.trajectories >= self.owner.runs
                select_for_budget(calibration, budget, runs, refine=complete)
                if complete:
                    self.owner.store.save(self.key, calibration)
        schedule = first_use_schedule(calibration, budget)
        path = self.owner.store.path(self.key)
        where = f"stored in {path}" if path is not None and path.exists() else "kept in memory"
        how = "validated by replay, " if "replay_error" in schedule.metadata else ""
        done = calibration.trajectories
        generations = f"{done} generation{'s' if done != 1 else ''}"
        if done < self.owner.runs:
            generations += f" of {self.owner.runs} so far"
        source = f"calibrated on first use ({how}{generations}, key {self.digest}, {where})"
        metadata = {**schedule.metadata, "source": source, "calibration_key": self.digest, GENERATIONS: done}
        return Schedule(schedule.num_steps, schedule.compute_steps, schedule.spans, metadata)

    def _recorded_runs(self, calibration: Calibration) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The key's last ``runs`` recorded runs with the calibration's step count, on the generation's device."""
        runs = [run for run in self.owner.store.runs(self.key) if len(run[0]) == calibration.num_steps]
        return [
            (latents.to(self.device), velocities.to(self.device)) for latents, velocities in runs[-self.owner.runs :]
        ]

    def calibrating(self, num_steps: int, budget: int) -> Schedule | None:
        """An all-computed schedule for a generation that calibrates (module docstring), or None when it cannot."""
        owner = self.owner
        if owner.runs == 0 or not _bridgeable(num_steps, budget) or budget == num_steps or self.key is None:
            return None
        stored = owner.store.load(self.key)
        done = stored.trajectories if stored is not None else 0
        if self.digest not in owner.announced:
            owner.announced.add(self.digest)
            logger.warning(
                "MeanCache: no schedule known for %s (%s) at %d steps and these settings (key %s): this generation "
                "runs in full, bit-identical to the uncached pipeline, while MeanCache calibrates; the next ones run "
                "budget %d with the schedule calibrated so far, and every %dth of them runs in full again until %d "
                "generations are observed (%d so far).",
                self.key["pipeline"], self.key["checkpoint"] or "unnamed checkpoint", num_steps, self.digest,
                budget, FULL_RUN_EVERY, owner.runs, done,
            )  # fmt: skip
        self.accumulator = StabilityCostAccumulator(self.key["sigmas"], MAX_GAP, MAX_SPAN)
        self.budget = budget
        self.trajectory = ([], [])
        self.started = time.perf_counter()
        source = f"calibrating on first use: generation {done + 1} of {owner.runs} runs in full (key {self.digest})"
        return Schedule(num_steps, tuple(range(num_steps)), (1,) * (num_steps - 1), {"source": source})

    def add_step(self, step: int, z: torch.Tensor, v: torch.Tensor) -> None:
        """Observe step ``step`` (latents before it, guided velocity) of the calibrating generation."""
        assert self.accumulator is not None
        self.accumulator.add_step(step, z, v)
        if self.trajectory is not None:
            for kept, tensor in zip(self.trajectory, (z, v), strict=True):
                kept.append(replay_sample(tensor).to("cpu", TRAJECTORY_DTYPE))

    def finish(self, call_pattern: list[list[int]]) -> None:
        """Fold the completed generation, which made ``call_pattern`` calls per step (``CALL_PATTERN``), into the
        key's stored calibration; the last calibrating generation adds the schedule validated selection picks for
        its budget (module docstring)."""
        assert self.accumulator is not None
        metadata = {
            "cost_kinds": ["one-shot", "closed-loop"], "calibration_seconds": time.perf_counter() - self.started,
            "source": "calibrated on first use", "pipeline": self.key["pipeline"], "model": self.key["checkpoint"],
            CALL_PATTERN: call_pattern,
        }  # fmt: skip
        calibration = self.accumulator.result(metadata)
        stored = self.owner.store.load(self.key)
        if stored is not None:
            calibration = combine_calibrations(stored, calibration)
        if self.trajectory is not None:
            self.owner.store.add_run(self.key, *(torch.stack(kept) for kept in self.trajectory))
            runs = self._recorded_runs(calibration)
            select_for_budget(calibration, self.budget, runs, refine=calibration.trajectories >= self.owner.runs)
        self.owner.store.save(self.key, calibration)
        for resolved in [k for k in self.owner.schedules if k[0] == self.digest]:  # solved from fewer generations
            del self.owner.schedules[resolved]
        self.accumulator = self.trajectory = None


def select_for_budget(
    calibration: Calibration, budget: int, runs: Sequence[tuple[torch.Tensor, torch.Tensor]], refine: bool
) -> None:
    """Record in ``calibration``'s metadata (``SELECTED``) the candidate schedule for ``budget`` and its estimator
    that :func:`~meancache.calibration.select_by_replay` picks on the recorded ``runs`` (latents, velocities), with
    ``refine``."""
    sigmas = calibration.sigmas
    chosen = select_by_replay(calibration.candidate_schedules(budget), [(*run, sigmas) for run in runs], refine)
    kept = ("gamma", "spacing_power", "max_gap", "max_span", "replay_error", "replay_candidates", "replay_moves",
            ESTIMATOR_KEY)  # a PSSP candidate has a gamma, a spaced one a spacing power  # fmt: skip
    entry = {name: chosen.metadata[name] for name in kept if name in chosen.metadata}
    entry |= {"compute_steps": list(chosen.compute_steps), "spans": list(chosen.spans)}
    calibration.metadata[SELECTED] = {**_selected(calibration), str(budget): entry}


def first_use_schedule(calibration: Calibration, budget: int) -> Schedule:
    """The schedule of a first-use calibration for ``budget``: the one validated selection stored for it, else
    the PSSP solution with the default solver settings (module docstring)."""
    n = calibration.num_steps
    selected = _selected(calibration).get(str(budget))
    if selected is not None:
        try:
            steps, spans = tuple(selected["compute_steps"]), tuple(selected["spans"])
            settings = {k: v for k, v in selected.items() if k not in ("compute_steps", "spans")}
            metadata = {**calibration.metadata, **settings, "cost_kind": "closed-loop", "budget": budget}
            return Schedule(n, steps, spans, {k: v for k, v in metadata.items() if k != SELECTED})
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            logger.warning("MeanCache: ignoring the invalid selected schedule for budget %d (%s)", budget, e)
    gap = min(MAX_GAP, max(SOLVER_GAP, math.ceil((n - 1) / max(budget - 1, 1))))
    found = solve_pssp(calibration.closed_loop[..., :SOLVER_MAX_SPAN], budget, gamma=GAMMA, max_gap=gap)
    schedule = calibration.without_step_0_anchor(found, SOLVER_MAX_SPAN)
    metadata = {k: v for k, v in schedule.metadata.items() if k != SELECTED}
    return Schedule(n, schedule.compute_steps, schedule.spans, metadata)


def _selected(calibration: Calibration) -> dict[str, Any]:
    """The calibration's selected schedules by budget (nothing if the metadata entry is not a JSON object)."""
    selected = calibration.metadata.get(SELECTED)
    return selected if isinstance(selected, dict) else {}


def _bridgeable(num_steps: int, budget: int) -> bool:
    """Whether ``budget`` computed steps can cover ``num_steps`` with gaps of at most ``MAX_GAP``."""
    return budget >= min(num_steps, math.ceil((num_steps - 1) / MAX_GAP) + 1)
