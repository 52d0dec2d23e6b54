"""The state MeanCache keeps for one pipeline: its settings, the generation in progress, the last summary.

A generation is announced by the scheduler's ``set_timesteps`` (every diffusers pipeline calls it before its
denoising loop) and starts at the first transformer call or scheduler step after it: its sigmas are fixed then,
and its schedule and estimator too when the configuration gives the schedule; with ``budget=`` they are fixed at
the first scheduler step (:meth:`MeanCacheState.resolve_schedule`: step 0 is computed in every schedule, and by
then MeanCache has seen the step's guidance), always outside any compiled region. It ends after the scheduler's
last step, which frees the estimator's history and keeps only the counters shown by :func:`meancache.summary`.
Calls of the transformer outside a generation (a direct call, or another pipeline sharing the transformer) are
not MeanCache's business and run as they are.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline, SchedulerMixin

from meancache.calibration import calibration_store
from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers.distributed import check_same_schedule_on_all_ranks
from meancache.integrations.diffusers.first_use import CALL_PATTERN, FirstUseCalibration, GenerationCalibration
from meancache.integrations.diffusers.guidance import observed_guidance
from meancache.integrations.diffusers.key import calibration_key
from meancache.integrations.diffusers.ranks import decide_on_rank_zero
from meancache.method.estimators import Estimator, make_estimator
from meancache.schedule import Schedule
from meancache.schedule.defaults import default_schedule

if TYPE_CHECKING:
    from meancache.integrations.diffusers.hooks import TransformerGate

logger = logging.getLogger(__name__)


@dataclass
class MeanCacheSummary:
    """What MeanCache did in one generation."""

    num_steps: int
    steps_run: int
    schedule: Schedule
    transformer_calls: int
    skipped_calls: int
    derivative_calls: int = 0
    """Transformer calls run as forward-mode (JVP) passes; included in ``transformer_calls``."""
    controlnet_calls: int = 0
    """ControlNet forwards that ran (ControlNet pipelines: the ControlNet runs on computed steps only)."""
    skipped_controlnet_calls: int = 0

    @property
    def computed_steps(self) -> int:
        return sum(self.schedule.is_computed(i) for i in range(self.steps_run))

    @property
    def reused_steps(self) -> int:
        return self.steps_run - self.computed_steps

    @property
    def spans_used(self) -> dict[int, int]:
        """Span ``K`` -> number of skipped steps that used it."""
        counts = Counter(self.schedule.span(i) for i in range(self.steps_run) if not self.schedule.is_computed(i))
        return dict(sorted(counts.items()))

    @property
    def ideal_speedup(self) -> float:
        """Steps per computed step: the speedup if the transformer were the only cost."""
        return self.steps_run / max(self.computed_steps, 1)

    def __str__(self) -> str:
        spans = ", ".join(f"K={k}: {n}" for k, n in self.spans_used.items()) or "none"
        mapped = self.schedule.metadata.get("mapped_from_steps")
        origin = f" (schedule mapped from {mapped} steps)" if mapped else ""
        unfinished = "" if self.steps_run == self.num_steps else f" of {self.num_steps} (interrupted)"
        jvp = f" ({self.derivative_calls} forward-mode)" if self.derivative_calls else ""
        source = self.schedule.metadata.get("source")
        controlnet = self.controlnet_calls + self.skipped_controlnet_calls
        controlnet_text = (
            f"; controlnet calls: {self.controlnet_calls} run, {self.skipped_controlnet_calls} skipped"
            if controlnet
            else ""
        )
        return (
            f"MeanCache: {self.steps_run} steps{unfinished}{origin}, {self.computed_steps} computed, "
            f"{self.reused_steps} reused (spans {spans}); transformer calls: {self.transformer_calls} run{jvp}, "
            f"{self.skipped_calls} skipped{controlnet_text}; ideal speedup {self.ideal_speedup:.2f}x"
            + (f"; schedule: {source}" if source else "")
        )


@dataclass
class GenerationRun:
    """One generation's state."""

    sigmas: list[float]
    estimator: Estimator
    steps_run: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    """Forwards that ran (``"transformer"``, ``"controlnet"``) and calls answered without running
    (``"transformer skipped"``, ``"controlnet skipped"``)."""
    derivative_calls: int = 0
    begin: int = 0
    """The scheduler's first step index (``begin_index``: image-to-image and inpainting at ``strength < 1``)."""
    branches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    """This step's (velocity, dv/dsigma) per transformer call, when the estimator asked for derivatives."""
    derivative_inputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    """The ``hidden_states`` of this step's forward-mode calls: checked against the latents the scheduler steps."""
    calls_this_step: Counter[str] = field(default_factory=Counter)
    """Calls so far in the current step, per kind of gated model (``"transformer"``: any expert; ``"controlnet"``):
    the index of the next call of that kind."""
    call_pattern: list[list[int]] = field(default_factory=list)
    """Per step so far: the transformer calls and the ControlNet calls it made (run or answered on a skipped step)."""
    outputs: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    """Per kind of gated model, copies of its outputs on the last computed step followed by a skipped one, in call
    order: the placeholders of the skipped steps' calls (:meth:`TransformerGate.placeholder`)."""
    outputs_step: int = -1
    """The step ``outputs`` were recorded on."""
    calibration: GenerationCalibration | None = field(default=None, repr=False)
    """Set when this generation calibrates on first use: it observes every step."""
    pending: bool = False
    """``budget=``: the schedule is resolved at the first scheduler step (:meth:`MeanCacheState.resolve_schedule`);
    until then every call runs (step 0 is computed in every schedule)."""
    first_calls: list[tuple[TransformerGate, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list, repr=False)
    """While the schedule is pending: the gate, arguments and keyword arguments of each transformer call."""
    latents: torch.Tensor | None = field(default=None, repr=False)
    """The tensor the generation started from (the first transformer call's ``hidden_states``), for the key."""
    in_loop: bool = False
    """Whether the pipeline's ``_current_timestep`` was set during this generation: diffusers pipelines set it on
    each step of their loop and reset it to None when a call begins and after the loop, so once it was set, None
    again means the pipeline left the loop (an interrupted generation: :meth:`MeanCacheState.run_for_call`)."""

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def schedule(self) -> Schedule:
        return self.estimator.schedule

    def summary(self) -> MeanCacheSummary:
        calls = self.calls
        return MeanCacheSummary(
            self.num_steps, self.steps_run, self.schedule, calls["transformer"], calls["transformer skipped"],
            self.derivative_calls, calls["controlnet"], calls["controlnet skipped"],
        )  # fmt: skip


class MeanCacheState:
    """State shared by the transformer gate and the scheduler hooks of one pipeline."""

    def __init__(self, config: MeanCacheConfig, pipe: DiffusionPipeline) -> None:
        self.config = config
        self._pipe = weakref.ref(pipe)
        self.scheduler: SchedulerMixin = pipe.scheduler
        self.pipeline_name = type(pipe).__name__
        self.checkpoint = str(pipe.name_or_path or pipe.transformer.config.get("_name_or_path", "") or "")
        self.model = type(getattr(pipe.transformer, "_orig_mod", pipe.transformer)).__name__
        self.gates: dict[str, TransformerGate] = {}
        """Pipeline component name (``transformer``, ``transformer_2`` for Wan2.2's second expert,
        ``unconditional_transformer`` for Ideogram4's CFG branch, ``controlnet``) -> its gate."""
        self.first_use = FirstUseCalibration(config.calibration_runs, calibration_store())
        self._mapping_warned: set[int] = set()
        self._decline_warned = False
        self._pattern_warned: set[str] = set()
        self._announced = False
        self.run: GenerationRun | None = None
        self.last_summary: MeanCacheSummary | None = None

    @property
    def pipe(self) -> DiffusionPipeline | None:
        return self._pipe()

    def announce_generation(self) -> None:
        """The scheduler was given new timesteps: the next transformer call or step starts a generation."""
        self.end_run()
        self._announced = True

    def run_for_call(self, latents: torch.Tensor | None) -> GenerationRun | None:
        """The generation a transformer call (``latents``: its ``hidden_states``) or scheduler step (its sample)
        belongs to, or None outside a generation."""
        in_loop = getattr(self.pipe, "_current_timestep", None) is not None
        if self._announced:
            self._announced = False
            self._start_run(latents)
        elif self.run is not None and self.run.in_loop and not in_loop:
            # an interrupted generation (diffusers' `_interrupt`, an exception): this call, before the pipeline's
            # next `set_timesteps` (GLM-Image's condition-image K/V), is no part of it
            self.end_run()
        elif self.run is None and (pipe := self.pipe) is not None and pipe.scheduler is not self.scheduler:
            raise RuntimeError(
                f"pipe.scheduler was replaced ({type(pipe.scheduler).__name__}) after enable_mean_cache, so MeanCache "
                "no longer sees the steps; call disable_mean_cache(pipe) and enable_mean_cache again"
            )
        if self.run is not None and in_loop:
            self.run.in_loop = True
        return self.run

    def finish_step(self, run: GenerationRun) -> None:
        run.call_pattern.append([run.calls_this_step["transformer"], run.calls_this_step["controlnet"]])
        run.steps_run += 1
        run.calls_this_step.clear()
        if run.steps_run == run.num_steps:
            if run.calibration is not None:
                run.calibration.finish(run.call_pattern)
            else:
                self._check_call_pattern(run)
            self.end_run()

    def _check_call_pattern(self, run: GenerationRun) -> None:
        """Warn, once per calibration, when a generation that took a first-use calibration made other calls per step
        than the generations that made it: a guidance setting acting only after the first step differs (Lumina 2's
        ``cfg_trunc_ratio``, SD3's skip-layer window, ControlNet ``control_guidance_start/end``), which the key,
        decided at the first step, cannot hold."""
        metadata = run.schedule.metadata
        expected, digest = metadata.get(CALL_PATTERN), metadata.get("calibration_key")
        if expected is None or expected == run.call_pattern or digest in self._pattern_warned:
            return
        self._pattern_warned.add(digest)
        step = next(i for i, pair in enumerate(run.call_pattern) if i >= len(expected) or expected[i] != pair)
        logger.warning(
            "MeanCache: this generation of %s made %s transformer (and ControlNet) calls at step %d where the "
            "generations that calibrated its schedule (key %s) made %s: a guidance setting that acts after the "
            "first step differs from theirs (cfg_trunc_ratio, skip-layer guidance, control_guidance_start/end, "
            "...), so the schedule was calibrated for another trajectory. `meancache calibrations clear %s` "
            "recalibrates on the next generations; or pass a schedule.",
            self.pipeline_name, run.call_pattern[step], step, digest,
            expected[step] if step < len(expected) else "none", digest,
        )  # fmt: skip

    def end_run(self) -> None:
        """Free the generation's history, keeping its summary."""
        if self.run is not None:
            self.last_summary = self.run.summary()
        self.run = None

    def rebase_run(self, run: GenerationRun, begin: int, latents: torch.Tensor) -> GenerationRun:
        """The first scheduler step of ``run`` is at ``begin``, not at ``run.begin``: a pipeline that slices its
        timesteps without telling the scheduler (no ``set_begin_index``). Restart the generation on the steps that
        really run, keeping what happened on its first step (the transformer calls, their recorded outputs)."""
        self._start_run(latents, begin)
        rebased = self.run
        assert rebased is not None
        rebased.calls, rebased.calls_this_step, rebased.derivative_calls = (
            run.calls, run.calls_this_step, run.derivative_calls
        )  # fmt: skip
        rebased.outputs, rebased.outputs_step, rebased.branches = run.outputs, run.outputs_step, run.branches
        rebased.first_calls = run.first_calls
        rebased.derivative_inputs = run.derivative_inputs
        return rebased

    def _start_run(self, latents: torch.Tensor | None, begin: int | None = None) -> None:
        """Start a generation at the scheduler's step ``begin`` (default: its ``begin_index``, or 0)."""
        self.end_run()
        scheduler = self.scheduler
        sigmas = [float(s) for s in scheduler.sigmas.tolist()]
        if len(sigmas) != len(scheduler.timesteps) + 1:
            raise ValueError(
                f"expected {len(scheduler.timesteps) + 1} sigmas for {len(scheduler.timesteps)} steps, the scheduler "
                f"has {len(sigmas)}"
            )
        if begin is None:  # strength < 1: the generation runs the last N - begin steps
            begin = scheduler.begin_index or 0
        sigmas = sigmas[begin:]
        num_steps = len(sigmas) - 1
        if self.config.schedule is None:  # budget=: resolved at the first scheduler step
            schedule = Schedule(num_steps, tuple(range(num_steps)), (1,) * (num_steps - 1),
                                {"source": "budget: resolved at the first scheduler step"})  # fmt: skip
        else:
            schedule = self._given_schedule(num_steps)
        run = GenerationRun(sigmas=sigmas, estimator=make_estimator(self.config.estimator, schedule), begin=begin,
                            pending=self.config.schedule is None, latents=latents)  # fmt: skip
        self._check_schedule(run)
        self.run = run

    def _check_schedule(self, run: GenerationRun) -> None:
        """Refuse what the gated models cannot run under this schedule; under context parallelism, check that every
        rank holds it (once it is final)."""
        for gate in self.gates.values():
            gate.check_composition(run)
        if "transformer" in self.gates and not run.pending:
            check_same_schedule_on_all_ranks(run.schedule, self.gates["transformer"].transformer)

    def resolve_schedule(self, run: GenerationRun, guided: torch.Tensor) -> None:
        """Fix the schedule of a ``budget=`` generation at its first scheduler step (``guided``: the velocity the
        scheduler received), and with it the estimator and whether the generation calibrates on first use
        (:meth:`_calibration_key`, computed only when no schedule shipped with the model applies). Decided on
        rank 0 under ``torch.distributed``: ranks that did not decide observe nothing."""
        config, num_steps = self.config, run.num_steps
        assert config.budget is not None
        budget = config.budget
        calibration: GenerationCalibration | None = None
        calls, latents = [kwargs for _, _, kwargs in run.first_calls], run.latents
        outputs = run.outputs.get("transformer", []) if run.outputs_step == 0 else []

        def resolve() -> Schedule:
            nonlocal calibration
            if config.calibration_runs and self.pipe is not None:
                calibration = self.first_use.for_generation(
                    lambda: self._calibration_key(run.sigmas, latents, calls, outputs, guided)
                )
            return default_schedule(self.pipeline_name, self.checkpoint, num_steps, budget, self.model, calibration)

        schedule = decide_on_rank_zero(resolve)
        run.estimator, run.pending, run.latents = make_estimator(config.estimator, schedule), False, None
        if calibration is not None and calibration.accumulator is not None:
            run.calibration = calibration
        self._check_schedule(run)
        first_calls, run.first_calls = run.first_calls, []
        if run.estimator.needs_derivative(0):  # the forward-mode pass step 0 needs, now that it is known
            for gate, args, kwargs in first_calls:
                gate.forward_with_derivative(run, args, kwargs)

    def _calibration_key(
        self, sigmas: list[float], latents: torch.Tensor | None, calls: list[dict[str, Any]], outputs: list[Any],
        guided: torch.Tensor,
    ) -> dict[str, Any] | None:  # fmt: skip
        """The generation's calibration key, its guidance part what the first step showed
        (:func:`observed_guidance`: ``calls`` the keyword arguments of its transformer calls, ``outputs`` what they
        returned, ``guided`` the velocity the scheduler received); None, with a warning once per pipeline, when the
        guidance cannot be identified (two guidance settings would share a calibration)."""
        pipe = self.pipe
        assert pipe is not None
        if any(later >= earlier for earlier, later in itertools.pairwise(sigmas)):
            # Stable Audio 3's audio-to-audio raises sigma after its first step; LongCat-AudioDiT counts 0 -> 1
            self._decline("its sigmas are not strictly decreasing (noise to data), which calibration measures along")
            return None
        observed = observed_guidance(pipe, calls, outputs, guided)
        if observed.unidentified is not None:
            self._decline(
                f"{observed.unidentified}, so the calibration could not be told apart from other guidance settings"
            )
            return None
        # every gated model shapes the trajectory: experts, a CFG branch's own model, a ControlNet
        models = torch.nn.ModuleDict({name: gate.transformer for name, gate in self.gates.items()})
        weights = self.first_use.fingerprint(models)
        return calibration_key(pipe, weights, self.checkpoint, sigmas, latents, calls, observed.settings)

    def _decline(self, reason: str) -> None:
        """Warn, once per pipeline, that its generations are not calibrated on first use, and why."""
        if not self._decline_warned:
            self._decline_warned = True
            logger.warning(
                "MeanCache: not calibrating %s on first use: %s. The budget runs evenly spaced steps with plain "
                "reuse; for MeanCache's estimate, pass a schedule for this model (MeanCacheConfig(schedule), e.g. "
                "from meancache calibrate).", self.pipeline_name, reason,
            )  # fmt: skip

    def _given_schedule(self, num_steps: int) -> Schedule:
        """``MeanCacheConfig``'s schedule for ``num_steps`` (mapped in sigma space from another step count)."""
        config = self.config
        assert config.schedule is not None
        schedule = config.schedule.for_steps(num_steps)
        if schedule is not config.schedule and num_steps not in self._mapping_warned:
            self._mapping_warned.add(num_steps)
            logger.warning(
                "MeanCache: the schedule was made for %d steps; this run has %d, so its computed steps are mapped "
                "in sigma space (budget %d kept). Calibrate for %d steps for a schedule made for this run.",
                config.schedule.num_steps, num_steps, schedule.budget, num_steps,
            )  # fmt: skip
        return schedule
