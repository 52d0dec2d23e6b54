"""The scheduler instance's hooks: where MeanCache sees each step's guided velocity and each new generation.

* :class:`SchedulerStepHook`, the scheduler *instance*'s ``step``. It sees the guided, post-CFG velocity
  (Qwen-Image's norm rescale included): on computed steps it logs it; on skipped steps it discards the
  placeholder-derived value and steps with the estimator's average velocity. So the estimator works on exactly
  the velocity the sampler uses, for every pipeline, as the paper's rule requires.
* :class:`SetTimestepsHook`, the scheduler instance's ``set_timesteps``: it announces each generation and puts the
  gates back on the modules ``pipe.transformer`` (and ``transformer_2``) are now (after ``transformer.compile()``
  filled the call slot, or ``pipe.transformer = torch.compile(pipe.transformer)`` replaced the module).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from meancache.integrations.diffusers.exact_jvp import step_derivative
from meancache.integrations.diffusers.gate import attach_gates
from meancache.integrations.diffusers.run import MeanCacheState


class SchedulerStepHook:
    """Installed as ``scheduler.step`` on the instance: logs or replaces the guided velocity of each step."""

    def __init__(self, state: MeanCacheState) -> None:
        self.state = state
        self.original = state.scheduler.step
        functools.update_wrapper(self, self.original)  # pipelines inspect the step's signature
        parameters = list(inspect.signature(self.original).parameters)
        # where per_token_timesteps would sit among the arguments after (model_output, timestep, sample), if the
        # scheduler takes it: found once here (binding the signature on every step costs more than the step)
        self._per_token_position = (
            parameters.index("per_token_timesteps") - 3 if "per_token_timesteps" in parameters else None
        )

    def __call__(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        position = self._per_token_position
        per_token = kwargs.get("per_token_timesteps")
        if position is not None and 0 <= position < len(args):
            per_token = args[position]
        if per_token is not None:
            raise ValueError("MeanCache does not support per_token_timesteps (every token must share one sigma)")
        run = self.state.run_for_call(sample)
        if run is None:  # a generation that began before MeanCache was enabled
            return self.original(model_output, timestep, sample, *args, **kwargs)
        step = run.steps_run
        scheduler = self.state.scheduler
        if step == 0 and scheduler.step_index is None and scheduler.begin_index is None:
            # the step the scheduler will take from the timestep: pipelines that slice their timesteps without
            # set_begin_index (Wan video-to-video) start later than MeanCache could see at the first transformer call
            begin = scheduler.index_for_timestep(timestep)
            if begin != run.begin:
                run = self.state.rebase_run(run, begin, sample)
        scheduler_step = scheduler.step_index  # None before the first step of a generation
        if scheduler_step != run.begin + step and not (step == 0 and scheduler_step is None):
            raise RuntimeError(
                f"the scheduler is at step {scheduler_step} but MeanCache expected step {run.begin + step}"
            )
        log = run.log
        if run.pending:
            self.state.resolve_schedule(run, model_output)
            first_calls, log.first_calls = log.first_calls, []
            if run.estimator.needs_derivative(0):  # the forward-mode pass step 0 needs, now that it is known
                for gate, call_args, call_kwargs in first_calls:
                    gate.forward_with_derivative(run, call_args, call_kwargs)
        sigma, sigma_next = run.sigmas[step], run.sigmas[step + 1]
        if run.schedule.is_computed(step):
            derivative = step_derivative(log.passes, sample, model_output)
            log.passes.clear()
            run.estimator.record(step, sample, sigma, model_output, derivative)
            if run.calibration is not None:
                run.calibration.add_step(step, sample, model_output)
        else:
            _, u_hat = run.estimator.estimate(step, sample, sigma, sigma_next)
            model_output = u_hat.to(model_output.dtype)
        output = self.original(model_output, timestep, sample, *args, **kwargs)
        self.state.finish_step(run)
        return output


class SetTimestepsHook:
    """Installed as ``scheduler.set_timesteps`` on the instance: each call announces a generation."""

    def __init__(self, state: MeanCacheState) -> None:
        self.state = state
        self.original = state.scheduler.set_timesteps
        functools.update_wrapper(self, self.original)  # retrieve_timesteps inspects its parameters

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.original(*args, **kwargs)
        attach_gates(self.state)
        self.state.announce_generation()
        return result
