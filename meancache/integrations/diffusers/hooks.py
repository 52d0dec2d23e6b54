"""The three instance-level hooks through which MeanCache drives a diffusers pipeline, sharing one
:class:`~meancache.integrations.diffusers.run.MeanCacheState`:

* :class:`TransformerGate` sits in the call slot (``module._compiled_call_impl``, the first thing
  ``torch.nn.Module.__call__`` looks at) of every transformer the pipeline holds (``transformer``,
  ``transformer_2`` for Wan2.2's second expert, ``unconditional_transformer`` for Ideogram4's CFG branch) and of
  its ControlNet (``controlnet``: a second model run each
  step whose residuals only feed the transformer). On a computed step it calls what it replaced: the eager
  ``_call_impl`` with every forward hook (diffusers' offloading, context-parallel and casting hooks,
  accelerate's offload hooks), or the compiled call that ``module.compile()`` put there. On a skipped step
  it answers every call with a copy of the same call's output on the last computed step (whatever its
  layout) and runs nothing. So it is outermost whatever order hooks were added in, and it is never traced by
  ``torch.compile``: no graph break, no guard on the step counter, no recompile.
* :class:`SchedulerStepHook`, the scheduler *instance*'s ``step``. It sees the guided, post-CFG velocity
  (Qwen-Image's norm rescale included): on computed steps it logs it; on skipped steps it discards the
  placeholder-derived value and steps with the estimator's average velocity.
* :class:`SetTimestepsHook`, the scheduler instance's ``set_timesteps``: it announces each generation and
  puts the gates back on the modules ``pipe.transformer`` (and ``transformer_2``) are now (after
  ``transformer.compile()`` filled the call slot, or ``pipe.transformer = torch.compile(pipe.transformer)``
  replaced the module).

So the estimator works on exactly the velocity the sampler uses, for every pipeline, as the paper's rule
requires. Estimators that need ``dv/dsigma`` (``"exact-jvp"``) get it per CFG branch from a forward-mode
pass of the transformer (:meth:`TransformerGate.forward_with_derivative`); the scheduler hook combines the
branch derivatives the way the pipeline combined the branches (:func:`guided_derivative`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Literal

import torch
import torch.utils._pytree
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import BaseOutput
from torch._dynamo.eval_frame import OptimizedModule

from meancache.integrations.diffusers.guidance import first_output, latent_block, latent_branches
from meancache.integrations.diffusers.run import GenerationRun, MeanCacheState
from meancache.integrations.jvp_attention import sdpa_as_jvp_attention

GateKind = Literal["transformer", "controlnet"]
"""What a gated module is: one of the pipeline's transformers (experts and a CFG branch's own model share a step's
calls), or its ControlNet."""


class TransformerGate:
    """``pipe.transformer``'s call while MeanCache is on: runs the transformer on computed steps only."""

    def __init__(self, state: MeanCacheState, module: torch.nn.Module, kind: GateKind = "transformer") -> None:
        self.state = state
        self.module = module
        self.kind: GateKind = kind
        """``"transformer"`` (every expert and CFG-branch model: they share the step's calls) or ``"controlnet"``."""
        self.inner = module.__dict__.get("_compiled_call_impl")
        """What the call slot held: ``module.compile()``'s compiled call, or None (the eager ``_call_impl``)."""
        module._compiled_call_impl = self

    @property
    def transformer(self) -> torch.nn.Module:
        """The transformer itself (inside ``torch.compile``'s wrapper, if the pipeline holds one)."""
        return self.module._orig_mod if isinstance(self.module, OptimizedModule) else self.module

    @property
    def compiled(self) -> bool:
        """Whether any of the transformer runs under ``torch.compile`` (whole, or block by block)."""
        if self.inner is not None or isinstance(self.module, OptimizedModule):
            return True
        root = self.transformer
        return any(m.__dict__.get("_compiled_call_impl") is not None for m in root.modules() if m is not root)

    def remove(self) -> None:
        """Give the call slot back what it held (if it still holds this gate)."""
        if self.module.__dict__.get("_compiled_call_impl") is self:
            if self.inner is None:
                vars(self.module).pop("_compiled_call_impl")
            else:
                self.module._compiled_call_impl = self.inner

    def call_transformer(self, *args: Any, **kwargs: Any) -> Any:
        return (self.inner or self.module._call_impl)(*args, **kwargs)

    def check_composition(self, run: GenerationRun) -> None:
        """Refuse what MeanCache cannot run under, before the generation's first call."""
        refuse_diffusers_cache(self.transformer)
        if self.compiled and any(run.estimator.needs_derivative(i) for i in range(run.num_steps)):
            raise RuntimeError(
                f"the {run.estimator.name!r} estimator runs the transformer in forward mode (torch.func.jvp), "
                "which torch.compile'd modules do not support; use the default estimator='paper' with a compiled "
                "transformer, or an uncompiled transformer"
            )
        if "controlnet" in self.state.gates and any(run.estimator.needs_derivative(i) for i in range(run.num_steps)):
            raise RuntimeError(
                f"the {run.estimator.name!r} estimator differentiates the transformer alone, but this pipeline's "
                "ControlNet residuals move with sigma too and would be held fixed (a wrong derivative); use the "
                "default estimator='paper' with ControlNet pipelines"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run = self.state.run_for_call(kwargs.get("hidden_states", args[0] if args else None))
        if run is None:  # not part of a generation: a direct call
            return self.call_transformer(*args, **kwargs)
        kind = self.kind
        if run.pending and kind == "transformer":  # the schedule is fixed at this step's scheduler call
            run.first_calls.append((self, args, kwargs))
        call = run.calls_this_step[kind]
        run.calls_this_step[kind] += 1
        step = run.steps_run
        if not run.schedule.is_computed(step):
            run.calls[f"{kind} skipped"] += 1
            batch = _batch_of(args[0] if args else kwargs.get("hidden_states")) if kind == "transformer" else None
            return self.placeholder(run, call, batch)
        if kind == "transformer" and run.estimator.needs_derivative(step):
            output = self.forward_with_derivative(run, args, kwargs)
        else:
            output = self.call_transformer(*args, **kwargs)
        run.calls[kind] += 1
        # step 0 too: if the first scheduler step shows the generation starts later (MeanCacheState.rebase_run),
        # the schedule for the steps that really run may skip step 1
        if step + 1 < run.num_steps and (step == 0 or not run.schedule.is_computed(step + 1)):
            if run.outputs_step != step:
                run.outputs, run.outputs_step = {}, step
            copy = torch.utils._pytree.tree_map_only(torch.Tensor, _detached_copy, output)
            run.outputs.setdefault(kind, []).append(copy)
        return output

    def placeholder(self, run: GenerationRun, call: int, batch: int | None) -> Any:
        """The answer to call number ``call`` of this kind of model on a skipped step: a copy of what the same call
        returned on the last computed step (the last call's, if this step makes more calls), so it has the
        *output*'s layout (a tensor, a list of per-sample tensors, extra reference-image tokens, a ControlNet's
        residuals, ...) and a stateful guider sees the last real branch predictions. When ``batch`` (this call's
        input batch: a tensor's first dimension, or a list's length) differs from that output's (CFG switched on
        or off between steps), its samples are cycled to that batch. The scheduler hook replaces whatever the
        pipeline makes of it."""
        outputs = run.outputs.get(self.kind)
        if not outputs:
            raise RuntimeError(f"step {run.steps_run} is skipped but no {self.kind} output was recorded before it")
        output = outputs[min(call, len(outputs) - 1)]
        if self.kind == "transformer":  # a ControlNet's residuals feed a skipped transformer call: any layout
            output = _cycled_output(output, batch)
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, output)

    def forward_with_derivative(self, run: GenerationRun, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One forward-mode pass: the velocity and its derivative along the trajectory, kept in ``run.branches``.

        Tangents: on ``hidden_states``, the velocity the previous step used on the latents' block (tiled over
        batched CFG branches) and 0 on whatever the pipeline appended (reference-image tokens, conditioning
        channels), which does not move with sigma; at step 0, the call's own output (one more call). On
        ``timestep``, ``d timestep / d sigma``."""
        hidden, timestep = kwargs.get("hidden_states"), kwargs.get("timestep")
        if not (isinstance(hidden, torch.Tensor) and isinstance(timestep, torch.Tensor)):
            raise TypeError(
                f"the {run.estimator.name!r} estimator needs the transformer called with hidden_states= and "
                "timestep= tensors; this pipeline passes them differently"
            )

        def velocity(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            call = {**kwargs, "hidden_states": h, "timestep": t, "return_dict": False}
            return first_output(self.call_transformer(*args, **call))

        if run.steps_run == 0:
            tangent = velocity(hidden, timestep)
            run.calls["transformer"] += 1
        else:
            tangent = _latents_tangent(run.estimator.last_velocity(), hidden)
        timestep = timestep.contiguous()  # pipelines may pass an expanded (stride-0) batch of timesteps
        timestep_rate = _timestep_rate(timestep, run.sigmas[run.steps_run], self.state.scheduler)
        with sdpa_as_jvp_attention(self.transformer):
            v, derivative = torch.func.jvp(velocity, (hidden, timestep), (tangent, timestep_rate))
        run.branches.append((v, derivative))
        run.derivative_inputs.append(hidden)
        run.derivative_calls += 1
        return Transformer2DModelOutput(sample=v) if kwargs.get("return_dict", True) else (v,)


def _timestep_rate(timestep: torch.Tensor, sigma: float, scheduler: Any) -> torch.Tensor:
    """``d timestep / d sigma`` for a transformer called with ``timestep`` at ``sigma``: pipelines pass sigma (Flux,
    Qwen-Image) or the scheduler's timestep, sigma times ``num_train_timesteps`` (HunyuanVideo, Wan, SD3), so the rate
    is ``timestep / sigma``. Anything else is refused rather than differentiated wrongly: Ideogram4 and Z-Image pass
    model time ``1 - sigma`` (whose rate is -1, not ``timestep / sigma``), and Ideogram4 also puts its text padding
    before the latent tokens, which the latents' tangent (:func:`_latents_tangent`) does not follow."""
    scales = (1.0, float(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000)))
    if not any(torch.allclose(timestep.float(), torch.full_like(timestep, sigma * c, dtype=torch.float32),
                              rtol=1e-2, atol=1e-3 * c) for c in scales):  # fmt: skip
        raise TypeError(
            f"the 'exact-jvp' estimator needs the transformer's timestep proportional to sigma (sigma or sigma * "
            f"{scales[1]:g}); this pipeline passes {timestep.flatten()[0].item():.4g} at sigma {sigma:.4g} (e.g. "
            "model time 1 - sigma). Use the default estimator='paper' with it"
        )
    return timestep / sigma


def refuse_diffusers_cache(transformer: torch.nn.Module) -> None:
    """MeanCache does not stack with diffusers' own caches: nested inside it, they would count MeanCache's computed
    steps as their steps (warm-ups, intervals and thresholds would mean something else) and skip some of them."""
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(
            "a diffusers cache (transformer.enable_cache: FirstBlockCache, TaylorSeer, MagCache, "
            "PyramidAttentionBroadcast, FasterCache) is on this transformer; it would count MeanCache's computed "
            "steps as its own steps and skip some of them. Use one of the two: pipe.transformer.disable_cache() "
            "or disable_mean_cache(pipe)"
        )


def attach_gates(state: MeanCacheState) -> None:
    """Make sure a gate of ``state`` is in the call slot of every model the pipeline runs per step
    (:func:`gated_modules`): ``pipe.transformer``, any further expert (``transformer_2``: Wan2.2's low-noise expert)
    or model of the step (``unconditional_transformer``: Ideogram4's CFG branch) and a ControlNet. They share the
    generation, so one schedule covers the whole trajectory whichever expert runs a step, and a ControlNet runs only
    on the steps whose transformer call it feeds. The transformers share the step's call index, so a skipped step's
    calls are answered in call order whichever model makes them (Ideogram4: the conditional call's output for the
    first, the unconditional model's for the second, as for true CFG in two calls).

    A gate moves off a module the pipeline no longer calls directly (``torch.compile(pipe.transformer)`` wraps it,
    and a gate left inside the wrapper would be traced), and re-wraps a call slot that ``module.compile()``
    filled after MeanCache was enabled."""
    pipe = state.pipe
    if pipe is None:
        return
    for name, kind in gated_modules(pipe).items():
        target = getattr(pipe, name)
        current = target.__dict__.get("_compiled_call_impl")
        if isinstance(current, TransformerGate):
            if current.state is state:
                continue
            raise RuntimeError(
                f"this {name} is already driven by MeanCache on another pipeline; disable it there first "
                "(or give each pipeline its own transformer)"
            )
        if name in state.gates:
            state.gates[name].remove()
        state.gates[name] = TransformerGate(state, target, kind)


def transformer_names(pipe: Any) -> list[str]:
    """The pipeline's transformer components that are modules: ``transformer``, then further experts
    (``transformer_2``, ...: Wan2.2's low-noise expert) and further models of the same step named ``*_transformer``
    (Ideogram4's ``unconditional_transformer``, its CFG branch's own model)."""
    components = getattr(pipe, "components", {})
    names = sorted(
        n for n in components if n == "transformer" or n.startswith("transformer_") or n.endswith("_transformer")
    )
    return [n for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def gated_modules(pipe: Any) -> dict[str, GateKind]:
    """The pipeline's components MeanCache gates, and their kind: the transformers (:func:`transformer_names`),
    then ``controlnet`` (ControlNet pipelines: Flux, SD3, Qwen-Image, Z-Image, Sana) if it is a module."""
    gated: dict[str, GateKind] = dict.fromkeys(transformer_names(pipe), "transformer")
    if isinstance(getattr(pipe, "controlnet", None), torch.nn.Module):
        gated["controlnet"] = "controlnet"
    return gated


def _detached_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def _batch_of(hidden: Any) -> int | None:
    """The batch of a transformer input: a tensor's first dimension, or a list of per-sample tensors' length."""
    if isinstance(hidden, torch.Tensor) and hidden.dim():
        return hidden.shape[0]
    if isinstance(hidden, (list, tuple)) and hidden and all(isinstance(h, torch.Tensor) for h in hidden):
        return len(hidden)
    return None


def _cycled_to_batch(output: Any, batch: int | None) -> Any:
    """``output`` (a tensor, or a list of per-sample tensors) with its samples cycled to ``batch`` (unchanged if
    ``batch`` is None or already its batch)."""
    have = _batch_of(output)
    if batch is None or have is None or have == batch:
        return output
    order = [i % have for i in range(batch)]
    return output[order] if isinstance(output, torch.Tensor) else [output[i] for i in order]


def _cycled_output(output: Any, batch: int | None) -> Any:
    """A transformer output with its prediction (a tensor, or a list of per-sample tensors) cycled to ``batch``."""
    if isinstance(output, torch.Tensor):
        return _cycled_to_batch(output, batch)
    if isinstance(output, tuple):
        return (_cycled_to_batch(output[0], batch), *output[1:])
    if isinstance(output, BaseOutput):
        first = next(iter(output))
        return type(output)(**{**output, first: _cycled_to_batch(output[first], batch)})
    raise TypeError(
        f"MeanCache cannot answer a skipped call of a transformer returning {type(output).__name__}; it "
        "supports tensors, tuples and diffusers output classes"
    )


def _check_latents_lead(inputs: list[torch.Tensor], sample: torch.Tensor) -> None:
    """Refuse, before any skipped step uses the derivative, a forward-mode pass whose ``hidden_states`` do not hold the
    latents the scheduler steps (``sample``) as their leading block in every batched branch: the tangent was put on
    that block (:func:`_latents_tangent`), so it was on the wrong values. Pipelines that keep the first frame from an
    image and step the others (HunyuanVideo's ``token_replace``, Kandinsky 5 and Sana image-to-video) do this."""
    batch = sample.shape[0]
    for hidden in inputs:
        lead = latent_block(hidden, torch.Size((hidden.shape[0], *sample.shape[1:])))
        if hidden.shape[0] % batch or not all(torch.equal(t, sample.to(hidden.dtype)) for t in lead.split(batch)):
            raise RuntimeError(
                f"the 'exact-jvp' estimator puts its tangent on the leading block of the transformer's hidden_states "
                f"{tuple(hidden.shape)}, but that block is not the latents {tuple(sample.shape)} the scheduler steps "
                "(e.g. a first frame kept from an image); use the default estimator='paper' with this pipeline"
            )


def _latents_tangent(velocity: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A tangent for ``hidden``: ``velocity`` (latent-shaped, tiled over batched CFG branches) on the latents'
    block, 0 elsewhere."""
    if hidden.shape[0] % velocity.shape[0]:
        raise RuntimeError(
            f"the 'exact-jvp' estimator puts its tangent on the latents in the transformer's hidden_states, but "
            f"hidden_states of shape {tuple(hidden.shape)} are not whole batches of the latents "
            f"{tuple(velocity.shape)} the scheduler steps; use the default estimator='paper' with this pipeline"
        )
    tangent = torch.zeros_like(hidden)
    tiles = hidden.shape[0] // velocity.shape[0]
    block = latent_block(tangent, velocity.shape).unflatten(0, (tiles, velocity.shape[0]))
    block.copy_(velocity.unsqueeze(0).expand_as(block))
    return tangent


class SchedulerStepHook:
    """Installed as ``scheduler.step`` on the instance: logs or replaces the guided velocity of each step."""

    def __init__(self, state: MeanCacheState) -> None:
        self.state = state
        self.original = state.scheduler.step
        functools.update_wrapper(self, self.original)  # pipelines inspect the step's signature
        self._signature = inspect.signature(self.original)

    def __call__(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        bound = self._signature.bind(model_output, timestep, sample, *args, **kwargs)
        if bound.arguments.get("per_token_timesteps") is not None:
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
        if run.pending:
            self.state.resolve_schedule(run, model_output)
        sigma, sigma_next = run.sigmas[step], run.sigmas[step + 1]
        if run.schedule.is_computed(step):
            if run.derivative_inputs:
                _check_latents_lead(run.derivative_inputs, sample)
            derivative = guided_derivative(run.branches, model_output) if run.branches else None
            run.branches.clear()
            run.derivative_inputs.clear()
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


def guided_derivative(branches: list[tuple[torch.Tensor, torch.Tensor]], guided: torch.Tensor) -> torch.Tensor:
    r"""``d guided / d sigma`` from each transformer call's velocity and derivative.

    Per sample, the guided velocity is written as the least-squares combination of the branch velocities,
    ``g = sum_b w_b v_b``, and the same weights combine the derivatives, ``dg = sum_b w_b dv_b``. This is
    exact for linear guidance (one branch, CFG, true CFG); for Qwen-Image's norm rescale, ``g`` is still in
    the branches' span, but the derivative of the rescale factor itself is left out. Batched CFG calls
    are split into their latent-sized parts; appended reference-image tokens are dropped, as the pipeline does."""
    batch = guided.shape[0]
    velocities, derivatives = [], []
    for v, d in branches:  # the latents' block, what the pipeline keeps
        velocities += latent_branches(v, guided)
        derivatives += latent_branches(d, guided)
    v = torch.stack(velocities, 1).reshape(batch, len(velocities), -1).double()  # (B, branches, features)
    d = torch.stack(derivatives, 1).reshape(batch, len(derivatives), -1).float()
    g = guided.reshape(batch, -1, 1).double()
    weights = torch.linalg.pinv(v @ v.transpose(1, 2)) @ (v @ g)  # (B, branches, 1)
    return (weights.float().transpose(1, 2) @ d).reshape(guided.shape)
