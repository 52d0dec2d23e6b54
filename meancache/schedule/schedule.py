"""Cache schedules as data: which sampler steps run the transformer, and the look-back span per interval.

A schedule for an ``N``-step sampler is the sorted list of *computed* steps ``c_0 = 0 < c_1 < ... <
c_{B-1} = N - 1`` (``B`` is the budget: transformer evaluations per CFG branch) and one look-back span
``K_j >= 1`` per interval ``c_j -> c_{j+1}``. The steps strictly inside an interval are skipped; each of
them estimates its velocity with span ``K_j`` (see :mod:`meancache.method.estimators`). The span of a unit
interval (``c_{j+1} = c_j + 1``) is ignored because nothing is skipped there.

Schedules made for ``N`` steps run on an ``M``-step sampler through :meth:`Schedule.for_steps`, which maps
each computed step ``c`` to the nearest of ``round(c * (M - 1) / (N - 1))`` keeping them distinct. For
diffusers' flow-matching schedulers ``sigma_i`` is a fixed function of ``i / N`` (before the shift), so this
is a mapping in sigma space: the computed steps keep their noise levels, the budget and the spans.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meancache.schedule.presets import preset_parts
from meancache.validation import MAX_STEPS, check_int, check_metadata, load_json_object

SCHEDULE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    """Computed steps and per-interval look-back spans for an ``num_steps``-step sampler.

    Args:
        num_steps: ``N``, the number of sampler steps the schedule is made for.
        compute_steps: the steps whose velocity comes from the transformer; strictly increasing, starting
            at 0 and ending at ``N - 1``.
        spans: ``spans[j]`` is the look-back span ``K`` used on the interval ``compute_steps[j] ->
            compute_steps[j + 1]``; ``len(spans) == len(compute_steps) - 1``.
        metadata: free-form provenance (model, source, ...) kept by :meth:`save` and :meth:`load`.
    """

    num_steps: int
    compute_steps: tuple[int, ...]
    spans: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    _step_spans: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        num_steps = check_int(self.num_steps, "num_steps", 1, MAX_STEPS)
        compute_steps = _int_tuple(self.compute_steps, "compute_steps")
        spans = _int_tuple(self.spans, "spans")
        object.__setattr__(self, "compute_steps", compute_steps)
        object.__setattr__(self, "spans", spans)
        object.__setattr__(self, "metadata", check_metadata(self.metadata))
        _validate(num_steps, compute_steps, spans)
        step_spans = [0] * self.num_steps
        for j, (start, end) in enumerate(itertools.pairwise(compute_steps)):
            for step in range(start + 1, end):
                step_spans[step] = spans[j]
        object.__setattr__(self, "_step_spans", tuple(step_spans))

    @property
    def budget(self) -> int:
        """``B``: transformer evaluations per CFG branch."""
        return len(self.compute_steps)

    @property
    def ideal_speedup(self) -> float:
        """``N / B``: the speedup if the transformer were the only cost."""
        return self.num_steps / self.budget

    @property
    def max_span(self) -> int:
        """The largest span used on a skipped step (1 when nothing is skipped)."""
        return max((k for k in self._step_spans if k), default=1)

    def is_computed(self, step: int) -> bool:
        """Whether ``step`` runs the transformer."""
        return self._step_spans[step] == 0

    def span(self, step: int) -> int:
        """The look-back span of skipped ``step`` (0 for a computed step)."""
        return self._step_spans[step]

    @classmethod
    def uniform(cls, num_steps: int, budget: int, span: int = 1) -> Schedule:
        """``budget`` computed steps spread evenly over ``num_steps`` (0 and ``N - 1`` included), one span."""
        num_steps = check_int(num_steps, "num_steps", 1, MAX_STEPS)
        budget = check_int(budget, "budget", min(2, num_steps), num_steps)
        if budget == 1:
            return cls(num_steps, (0,), ())
        steps = tuple(round(j * (num_steps - 1) / (budget - 1)) for j in range(budget))
        return cls(num_steps, steps, (span,) * (budget - 1), {"source": f"uniform(budget={budget}, span={span})"})

    @classmethod
    def preset(cls, name: str, budget: int) -> Schedule:
        """A published 50-step schedule; see :data:`meancache.schedule.presets.PRESETS` for the names."""
        return cls(*preset_parts(name, budget))

    def for_steps(self, num_steps: int) -> Schedule:
        """This schedule on a ``num_steps``-step sampler: itself, or mapped in sigma space (module docstring)."""
        if num_steps == self.num_steps:
            return self
        if self.budget == 1:
            raise ValueError(
                f"a 1-step schedule cannot be mapped to {num_steps!r} steps: its only computed step cannot be both "
                "the first and the last of a longer run"
            )
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not self.budget <= num_steps <= MAX_STEPS:
            raise ValueError(
                f"a schedule with budget {self.budget} (made for {self.num_steps} steps) cannot run "
                f"{num_steps!r} steps: the step count must be an integer in [{self.budget}, {MAX_STEPS}]"
            )
        scale = (num_steps - 1) / (self.num_steps - 1)
        mapped = [round(c * scale) for c in self.compute_steps]
        for j in range(1, len(mapped)):  # keep them distinct, pushing right...
            mapped[j] = max(mapped[j], mapped[j - 1] + 1)
        mapped[-1] = num_steps - 1
        for j in range(len(mapped) - 2, -1, -1):  # ...then left where the right end was reached
            mapped[j] = min(mapped[j], mapped[j + 1] - 1)
        metadata = {**self.metadata, "mapped_from_steps": self.num_steps}
        return Schedule(num_steps, tuple(mapped), self.spans, metadata)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": SCHEDULE_FORMAT_VERSION,
            "num_steps": self.num_steps,
            "budget": self.budget,
            "compute_steps": list(self.compute_steps),
            "spans": list(self.spans),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        missing = {"num_steps", "compute_steps", "spans"} - set(data)
        if missing:
            raise ValueError(f"schedule data lacks the keys {sorted(missing)}; it has {sorted(data)}")
        version = data.get("format_version", SCHEDULE_FORMAT_VERSION)
        if version != SCHEDULE_FORMAT_VERSION:
            raise ValueError(
                f"schedule format_version {version!r} is not supported (expected {SCHEDULE_FORMAT_VERSION})"
            )
        schedule = cls(data["num_steps"], data["compute_steps"], data["spans"], data.get("metadata", {}))
        if "budget" in data and data["budget"] != schedule.budget:
            raise ValueError(f"schedule says budget {data['budget']!r} but lists {schedule.budget} computed steps")
        return schedule

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the schedule and its metadata as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schedule:
        """Read a schedule written by :meth:`save` (or by ``meancache schedule``); every check of the
        constructor and :meth:`from_dict` applies, and an error names the file."""
        data = load_json_object(path, "schedule")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{os.fspath(path)!r} is not a valid schedule: {e}") from e


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    """``values``, a sequence of integers (lists, tuples, ranges; not a string), as a tuple of ints."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of integers, got {values!r} ({type(values).__name__})")
    for value in values:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must hold integers, got {value!r} ({type(value).__name__})")
    return tuple(int(v) for v in values)


def _validate(num_steps: int, compute_steps: Sequence[int], spans: Sequence[int]) -> None:
    """Steps 0 and ``N - 1`` computed, computed steps strictly increasing and in range, one span per interval,
    each in ``[1, num_steps]`` (a span reaches back at most to step 0: larger ones only inflate the history)."""
    if not compute_steps:
        raise ValueError("compute_steps is empty: step 0 must be computed")
    if compute_steps[0] != 0:
        raise ValueError(
            f"step 0 must be computed (it has no history to estimate from); compute_steps starts at {compute_steps[0]}"
        )
    for a, b in itertools.pairwise(compute_steps):
        if b <= a:
            raise ValueError(f"compute_steps must be strictly increasing, but {b} follows {a}")
    bad = [s for s in compute_steps if not 0 <= s < num_steps]
    if bad:
        raise ValueError(f"compute_steps {bad} are out of range for {num_steps} steps (allowed: 0..{num_steps - 1})")
    if compute_steps[-1] != num_steps - 1:
        raise ValueError(f"the last step ({num_steps - 1}) must be computed; compute_steps ends at {compute_steps[-1]}")
    if len(spans) != len(compute_steps) - 1:
        raise ValueError(
            f"spans needs one entry per interval between computed steps: {len(compute_steps) - 1} for "
            f"{len(compute_steps)} computed steps, got {len(spans)}"
        )
    bad_spans = [k for k in spans if not 1 <= k <= num_steps]
    if bad_spans:
        raise ValueError(
            f"spans must be in [1, {num_steps}] for {num_steps} steps (K = 1 is plain velocity reuse), got {bad_spans}"
        )
