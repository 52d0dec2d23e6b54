"""The gate: what sits in the call slot of each model the pipeline runs per step while MeanCache is on.

:class:`TransformerGate` sits in the call slot (``module._compiled_call_impl``, the first thing
``torch.nn.Module.__call__`` looks at) of every transformer the pipeline holds (``transformer``, ``transformer_2``
for Wan2.2's second expert, ``unconditional_transformer`` for Ideogram4's CFG branch) and of its ControlNet
(``controlnet``: a second model run each step whose residuals only feed the transformer;
:mod:`~meancache.integrations.diffusers.components` finds them). On a computed step it calls what it replaced: the
eager ``_call_impl`` with every forward hook (diffusers' offloading, context-parallel and casting hooks,
accelerate's offload hooks), or the compiled call that ``module.compile()`` put there; when the estimator asks for
``dv/dsigma`` it runs the call in forward mode instead (:mod:`~meancache.integrations.diffusers.exact_jvp`). On a
skipped step it answers every call with a copy of the same call's output on the last computed step (whatever its
layout) and runs nothing. So it is outermost whatever order hooks were added in, and it is never traced by
``torch.compile``: no graph break, no guard on the step counter, no recompile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule

from meancache.integrations.diffusers.components import GateKind, gated_modules
from meancache.integrations.diffusers.exact_jvp import derivative_pass
from meancache.integrations.diffusers.layout import batch_of, copy_tensors, cycled_output
from meancache.integrations.diffusers.run import GenerationRun, MeanCacheState


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

    def is_compiled(self) -> bool:
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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run = self.state.run_for_call(kwargs.get("hidden_states", args[0] if args else None))
        if run is None:  # not part of a generation: a direct call
            return self.call_transformer(*args, **kwargs)
        kind, log = self.kind, run.log
        if run.pending and kind == "transformer":  # the schedule is fixed at this step's scheduler call
            log.first_calls.append((self, args, kwargs))
        call = log.calls_this_step[kind]
        log.calls_this_step[kind] += 1
        step = run.steps_run
        if not run.schedule.is_computed(step):
            log.calls[f"{kind} skipped"] += 1
            batch = batch_of(args[0] if args else kwargs.get("hidden_states")) if kind == "transformer" else None
            return self.placeholder(run, call, batch)
        if kind == "transformer" and run.estimator.needs_derivative(step):
            output = self.forward_with_derivative(run, args, kwargs)
        else:
            output = self.call_transformer(*args, **kwargs)
        log.calls[kind] += 1
        # step 0 too: if the first scheduler step shows the generation starts later (MeanCacheState.rebase_run),
        # the schedule for the steps that really run may skip step 1
        if step + 1 < run.num_steps and (step == 0 or not run.schedule.is_computed(step + 1)):
            if log.outputs_step != step:
                log.outputs, log.outputs_step = {}, step
            log.outputs.setdefault(kind, []).append(copy_tensors(output))
        return output

    def placeholder(self, run: GenerationRun, call: int, batch: int | None) -> Any:
        """The answer to call number ``call`` of this kind of model on a skipped step: a copy of what the same call
        returned on the last computed step (the last call's, if this step makes more calls), so it has the
        *output*'s layout (a tensor, a list of per-sample tensors, extra reference-image tokens, a ControlNet's
        residuals, ...) and a stateful guider sees the last real branch predictions. When ``batch`` (this call's
        input batch: a tensor's first dimension, or a list's length) differs from that output's (CFG switched on
        or off between steps), its samples are cycled to that batch. The scheduler hook replaces whatever the
        pipeline makes of it."""
        outputs = run.log.outputs.get(self.kind)
        if not outputs:
            raise RuntimeError(f"step {run.steps_run} is skipped but no {self.kind} output was recorded before it")
        output = outputs[min(call, len(outputs) - 1)]
        if self.kind == "transformer":  # a ControlNet's residuals feed a skipped transformer call: any layout
            output = cycled_output(output, batch)
        return copy_tensors(output)

    def forward_with_derivative(self, run: GenerationRun, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """This call as one forward-mode pass (:func:`~meancache.integrations.diffusers.exact_jvp.derivative_pass`),
        kept in ``run.log.passes`` for the step's derivative."""
        step = run.steps_run
        result = derivative_pass(self.call_transformer, self.transformer, run.estimator, step, run.sigmas[step],
                                 self.state.scheduler, args, kwargs)  # fmt: skip
        run.log.calls["transformer"] += result.tangent_calls
        run.log.passes.append(result)
        run.log.derivative_calls += 1
        return result.output


def attach_gates(state: MeanCacheState) -> None:
    """Make sure a gate of ``state`` is in the call slot of every model the pipeline runs per step
    (:func:`~meancache.integrations.diffusers.components.gated_modules`): ``pipe.transformer``, any further expert
    (``transformer_2``: Wan2.2's low-noise expert) or model of the step (``unconditional_transformer``: Ideogram4's
    CFG branch) and a ControlNet. They share the generation, so one schedule covers the whole trajectory whichever
    expert runs a step, and a ControlNet runs only on the steps whose transformer call it feeds. The transformers
    share the step's call index, so a skipped step's calls are answered in call order whichever model makes them
    (Ideogram4: the conditional call's output for the first, the unconditional model's for the second, as for true
    CFG in two calls).

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
