"""An independent MeanCache reference, written from MEANCACHE.md section 2 like the authors' scripts:
it logs every step in full (O(N) memory) and shares no code with the library."""

import contextlib
import itertools

import torch


class ReferenceMeanCache:
    """Feed it each step's latent and (on computed steps) fresh velocity; it returns the velocity to use."""

    def __init__(self, sigmas, compute_steps, spans):
        self.sigmas = [float(s) for s in sigmas]
        self.span_of = {}
        for j, (a, b) in enumerate(itertools.pairwise(compute_steps)):
            for i in range(a + 1, b):
                self.span_of[i] = spans[j]
        self.z_log, self.v_log = [], []

    def computes(self, i):
        return i not in self.span_of

    def velocity(self, i, z, fresh=None):
        z = z.float()
        if self.computes(i):
            v = fresh.float()
        else:
            s = self.sigmas
            k = min(self.span_of[i], len(self.z_log))
            r = i - k
            ubar = (z - self.z_log[r]) / (s[i] - s[r])
            jvp = (ubar - self.v_log[r]) / (s[i] - s[r])
            v = self.v_log[i - 1] + (s[i + 1] - s[i]) * jvp
        self.z_log.append(z.clone())
        self.v_log.append(v.clone())
        return v


def reference_sample(velocity_fn, z, sigmas, compute_steps, spans):
    ref = ReferenceMeanCache(sigmas, compute_steps, spans)
    for i in range(len(sigmas) - 1):
        fresh = velocity_fn(z, float(sigmas[i])) if ref.computes(i) else None
        v = ref.velocity(i, z, fresh)
        z = (z.float() + (float(sigmas[i + 1]) - float(sigmas[i])) * v).to(z.dtype)
    return z


def toy_velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth non-linear velocity field, so spans K > 1 make a difference."""
    return torch.sin(3.0 * sigma + z) - (1.0 + sigma) * z


def history_peak_bytes(estimator, z, sigmas, each_step=None):
    """Drive ``estimator`` over its schedule on :func:`toy_velocity` from ``z`` (record on computed steps, estimate
    on skipped ones) and return the most history bytes it held; ``each_step(estimator)`` runs after every step."""
    peak = 0
    for i in range(estimator.schedule.num_steps):
        if estimator.schedule.is_computed(i):
            v = toy_velocity(z, sigmas[i])
            estimator.record(i, z, sigmas[i], v)
            z = z + (sigmas[i + 1] - sigmas[i]) * v
        else:
            z, _ = estimator.estimate(i, z, sigmas[i], sigmas[i + 1])
        peak = max(peak, estimator.history_bytes())
        if each_step is not None:
            each_step(estimator)
    return peak


@contextlib.contextmanager
def reference_steps(scheduler, compute_steps, spans):
    """While active, an (uncached) diffusers pipeline's ``scheduler`` steps with the reference rule's velocity:
    the model's output on computed steps, the reference estimate on the others. A generation runs the scheduler's
    steps from its ``begin_index`` (image-to-image at ``strength < 1``) over ``sigmas[begin_index:]``."""
    original = scheduler.step
    state = {}

    def step(model_output, timestep, sample, *args, **kwargs):
        if scheduler.step_index is None:  # a new generation
            begin = scheduler.begin_index or 0
            state["ref"], state["i"] = ReferenceMeanCache(scheduler.sigmas[begin:], compute_steps, spans), 0
        ref, i = state["ref"], state["i"]
        v = ref.velocity(i, sample, model_output)
        state["i"] = i + 1
        return original(v.to(model_output.dtype), timestep, sample, *args, **kwargs)

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step
