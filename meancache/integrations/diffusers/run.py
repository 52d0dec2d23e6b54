"""The generation lifecycle: the state MeanCache keeps for one pipeline, and for the generation in progress.

A generation is announced by the scheduler's ``set_timesteps`` (every diffusers pipeline calls it before its
denoising loop) and starts at the first transformer call or scheduler step after it: its sigmas are fixed then,
and its schedule and estimator too when the configuration gives the schedule; with ``budget=`` they are fixed at
the first scheduler step (:meth:`MeanCacheState.resolve_schedule`: step 0 is computed in every schedule, and by
then MeanCache has seen the step's guidance), always outside any compiled region. It ends after the scheduler's
last step, which frees the estimator's history and keeps only the counters shown by :func:`meancache.summary`.
Calls of the transformer outside a generation (a direct call, or another pipeline sharing the transformer) are
not MeanCache's business and run as they are.

The state holds no reference to the hooks' classes: what it reads of a gate is the :class:`Gate` protocol, and
the hooks (:mod:`~meancache.integrations.diffusers.gate`, :mod:`~meancache.integrations.diffusers.scheduler_hooks`)
call into it, never the other way round.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import DiffusionPipeline, SchedulerMixin

from meancache.calibration import calibration_store
from meancache.config import MeanCacheConfig
from meancache.integrations.diffusers.components import GateKind, refuse_diffusers_cache
from meancache.integrations.diffusers.distributed import check_same_schedule_on_all_ranks
from meancache.integrations.diffusers.exact_jvp import DerivativePass, refuse_derivative_composition
from meancache.integrations.diffusers.first_use import FirstUseCalibration, GenerationCalibration
from meancache.integrations.diffusers.generation_summary import MeanCacheSummary
from meancache.integrations.diffusers.ranks import decide_on_rank_zero
from meancache.method.estimators import Estimator, make_estimator
from meancache.schedule import Schedule
from meancache.schedule.defaults import default_schedule

logger = logging.getLogger(__name__)


class Gate(Protocol):
    """What the lifecycle reads of a gated model's gate
    (:class:`~meancache.integrations.diffusers.gate.TransformerGate`)."""

    kind: GateKind

    @property
    def transformer(self) -> torch.nn.Module:
        """The gated model itself (inside ``torch.compile``'s wrapper, if the pipeline holds one)."""

    def is_compiled(self) -> bool:
        """Whether any of the model runs under ``torch.compile`` (walks its modules)."""

    def remove(self) -> None:
        """Give the model's call slot back what it held."""

    def forward_with_derivative(self, run: GenerationRun, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one call of the model in forward mode, keeping its derivative in ``run.log.passes``."""


@dataclass
class CallLog:
    """What the gated models' calls did so far in one generation. A generation restarted on its first scheduler step
    (:meth:`MeanCacheState.rebase_run`) keeps this object whole: every field here carries over."""

    calls: Counter[str] = field(default_factory=Counter)
    """Forwards that ran (``"transformer"``, ``"controlnet"``) and calls answered without running
    (``"transformer skipped"``, ``"controlnet skipped"``)."""
    calls_this_step: Counter[str] = field(default_factory=Counter)
    """Calls so far in the current step, per kind of gated model (``"transformer"``: any expert; ``"controlnet"``):
    the index of the next call of that kind."""
    derivative_calls: int = 0
    outputs: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    """Per kind of gated model, copies of its outputs on the last computed step followed by a skipped one, in call
    order: the placeholders of the skipped steps' calls (:meth:`TransformerGate.placeholder`)."""
    outputs_step: int = -1
    """The step ``outputs`` were recorded on."""
    passes: list[DerivativePass] = field(default_factory=list, repr=False)
    """This step's forward-mode transformer calls, when the estimator asked for derivatives."""
    first_calls: list[tuple[Gate, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list, repr=False)
    """While the schedule is pending: the gate, arguments and keyword arguments of each transformer call."""
    in_loop: bool = False
    """Whether the pipeline's ``_current_timestep`` was set during this generation: diffusers pipelines set it on
    each step of their loop and reset it to None when a call begins and after the loop, so once it was set, None
    again means the pipeline left the loop (an interrupted generation: :meth:`MeanCacheState.run_for_call`)."""


@dataclass
class GenerationRun:
    """One generation's state: what was fixed when it started, its progress, and its :class:`CallLog`."""

    sigmas: list[float]
    estimator: Estimator
    begin: int = 0
    """The scheduler's first step index (``begin_index``: image-to-image and inpainting at ``strength < 1``)."""
    pending: bool = False
    """``budget=``: the schedule is resolved at the first scheduler step (:meth:`MeanCacheState.resolve_schedule`);
    until then every call runs (step 0 is computed in every schedule)."""
    latents: torch.Tensor | None = field(default=None, repr=False)
    """The tensor the generation started from (the first transformer call's ``hidden_states``), for the key."""
    calibration: GenerationCalibration | None = field(default=None, repr=False)
    """Set when this generation calibrates on first use: it observes every step."""
    steps_run: int = 0
    call_pattern: list[list[int]] = field(default_factory=list)
    """Per step so far: the transformer calls and the ControlNet calls it made (run or answered on a skipped step)."""
    log: CallLog = field(default_factory=CallLog)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def schedule(self) -> Schedule:
        return self.estimator.schedule

    def summary(self) -> MeanCacheSummary:
        calls = self.log.calls
        return MeanCacheSummary(
            self.num_steps, self.steps_run, self.schedule, calls["transformer"], calls["transformer skipped"],
            self.log.derivative_calls, calls["controlnet"], calls["controlnet skipped"], self.estimator.name,
        )  # fmt: skip


class MeanCacheState:
    """State shared by the gates and the scheduler hooks of one pipeline."""

    def __init__(self, config: MeanCacheConfig, pipe: DiffusionPipeline) -> None:
        self.config = config
        self._pipe = weakref.ref(pipe)
        self.scheduler: SchedulerMixin = pipe.scheduler
        self.pipeline_name = type(pipe).__name__
        self.checkpoint = str(pipe.name_or_path or pipe.transformer.config.get("_name_or_path", "") or "")
        self.model = type(getattr(pipe.transformer, "_orig_mod", pipe.transformer)).__name__
        self.gates: dict[str, Gate] = {}
        """Pipeline component name (``transformer``, ``transformer_2`` for Wan2.2's second expert,
        ``unconditional_transformer`` for Ideogram4's CFG branch, ``controlnet``) -> its gate."""
        self.first_use = FirstUseCalibration(config.calibration_runs, calibration_store())
        self._mapping_warned: set[int] = set()
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
        elif self.run is not None and self.run.log.in_loop and not in_loop:
            # an interrupted generation (diffusers' `_interrupt`, an exception): this call, before the pipeline's
            # next `set_timesteps` (GLM-Image's condition-image K/V), is no part of it
            self.end_run()
        elif self.run is None and (pipe := self.pipe) is not None and pipe.scheduler is not self.scheduler:
            raise RuntimeError(
                f"pipe.scheduler was replaced ({type(pipe.scheduler).__name__}) after enable_mean_cache, so MeanCache "
                "no longer sees the steps; call disable_mean_cache(pipe) and enable_mean_cache again"
            )
        if self.run is not None and in_loop:
            self.run.log.in_loop = True
        return self.run

    def finish_step(self, run: GenerationRun) -> None:
        log = run.log
        run.call_pattern.append([log.calls_this_step["transformer"], log.calls_this_step["controlnet"]])
        run.steps_run += 1
        log.calls_this_step.clear()
        if run.steps_run == run.num_steps:
            if run.calibration is not None:
                run.calibration.finish(run.call_pattern)
            else:
                self.first_use.check_call_pattern(self.pipeline_name, run.schedule, run.call_pattern)
            self.end_run()

    def end_run(self) -> None:
        """Free the generation's history, keeping its summary."""
        if self.run is not None:
            self.last_summary = self.run.summary()
        self.run = None

    def rebase_run(self, run: GenerationRun, begin: int, latents: torch.Tensor) -> GenerationRun:
        """The first scheduler step of ``run`` is at ``begin``, not at ``run.begin``: a pipeline that slices its
        timesteps without telling the scheduler (no ``set_begin_index``). Restart the generation on the steps that
        really run, keeping what happened on its first step (its :class:`CallLog`)."""
        self._start_run(latents, begin, run.log)
        assert self.run is not None
        return self.run

    def _start_run(self, latents: torch.Tensor | None, begin: int | None = None, log: CallLog | None = None) -> None:
        """Start a generation at the scheduler's step ``begin`` (default: its ``begin_index``, or 0), with the calls
        ``log`` of a restarted one."""
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
                            pending=self.config.schedule is None, latents=latents, log=log or CallLog())  # fmt: skip
        self._check_schedule(run)
        self.run = run

    def _check_schedule(self, run: GenerationRun) -> None:
        """Refuse what the gated models cannot run under this schedule; under context parallelism, check that every
        rank holds it (once it is final)."""
        for gate in self.gates.values():
            refuse_diffusers_cache(gate.transformer)
            refuse_derivative_composition(run.estimator, run.num_steps, gate.is_compiled, "controlnet" in self.gates)
        if "transformer" in self.gates and not run.pending:
            check_same_schedule_on_all_ranks(run.schedule, self.gates["transformer"].transformer)

    def resolve_schedule(self, run: GenerationRun, guided: torch.Tensor) -> None:
        """Fix the schedule of a ``budget=`` generation at its first scheduler step (``guided``: the velocity the
        scheduler received), and with it the estimator and whether the generation calibrates on first use (the key,
        :meth:`FirstUseCalibration.generation_key`, is computed only when no schedule shipped with the model
        applies). Decided on rank 0 under ``torch.distributed``: ranks that did not decide observe nothing. The
        transformer calls of the step stay in ``run.log.first_calls`` for the caller."""
        config, num_steps = self.config, run.num_steps
        assert config.budget is not None
        budget = config.budget
        calibration: GenerationCalibration | None = None
        log, latents = run.log, run.latents
        calls = [kwargs for _, _, kwargs in log.first_calls]
        outputs = log.outputs.get("transformer", []) if log.outputs_step == 0 else []

        def key(pipe: DiffusionPipeline) -> dict[str, Any] | None:
            # every gated model shapes the trajectory: experts, a CFG branch's own model, a ControlNet
            models = torch.nn.ModuleDict({name: gate.transformer for name, gate in self.gates.items()})
            return self.first_use.generation_key(pipe, models, self.checkpoint, run.sigmas, latents, calls, outputs,
                                                 guided)  # fmt: skip

        def resolve() -> Schedule:
            nonlocal calibration
            if config.calibration_runs and (pipe := self.pipe) is not None:
                calibration = self.first_use.for_generation(lambda: key(pipe), guided.device)
            return default_schedule(self.pipeline_name, self.checkpoint, num_steps, budget, self.model, calibration)

        schedule = decide_on_rank_zero(resolve)
        run.estimator, run.pending, run.latents = make_estimator(config.estimator, schedule), False, None
        if calibration is not None and calibration.accumulator is not None:
            run.calibration = calibration
        self._check_schedule(run)

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
