"""The published 50-step schedules of the MeanCache authors' scripts (``calc_dict`` / ``edge_source``).

Each table is written as the authors list it: computed steps as runs (``(a, b)`` is ``a..b`` inclusive),
and one label per interval between consecutive computed steps: ``"c"`` for a unit interval (nothing
skipped; stored as span 1) or the look-back span ``K``. No schedules were published for FLUX.1 or
HunyuanVideo; those come from calibration.
"""

from __future__ import annotations

from meancache.schedule.schedule import Schedule

_SOURCE = "MeanCache authors' scripts (UnicomAI/MeanCache), transcribed"

# name -> budget -> (computed steps as ints or inclusive runs, interval labels)
_TABLES: dict[str, dict[int, tuple[list[int | tuple[int, int]], str]]] = {
    "qwen-image": {
        25: ([(0, 16), 24, 32, 40, 43, 45, 47, 48, 49], "c" * 16 + "111555cc"),
        17: ([(0, 8), 10, 17, 24, 31, 38, 45, 48, 49], "c" * 8 + "2111114c"),
        10: ([0, 1, 3, 7, 14, 21, 28, 35, 42, 49], "c2111111" + "4"),
    },
    "qwen-image-2512": {
        25: ([(0, 15), 23, 31, 37, (44, 49)], "c" * 15 + "2221" + "c" * 5),
        17: ([(0, 9), 11, 19, 27, 35, 43, 47, 49], "c" * 9 + "2111155"),
        10: ([0, 2, 4, 7, 14, 21, 28, 35, 42, 49], "13111111" + "4"),
    },
    "z-image": {
        25: ([(0, 6), 8, (10, 13), (15, 18), 20, 22, 29, 37, 42, 45, (47, 49)], "cccccc22ccc2ccc55111" + "55cc"),
        20: ([(0, 4), 6, 8, 10, 12, 14, 16, 18, 20, 22, 30, 38, 43, 46, 48, 49], "cccc22222545511152c"),
        17: ([(0, 4), 6, 8, 10, 12, 14, 19, 27, 35, 43, 46, 48, 49], "cccc22222111152c"),
        15: ([(0, 3), 5, 7, 10, 12, 17, 25, 33, 41, 45, 48, 49], "ccc2222111154c"),
        13: ([(0, 3), 5, 9, 15, 22, 29, 36, 43, 47, 49], "ccc211111152"),
    },
}

PRESETS: dict[str, tuple[int, ...]] = {name: tuple(sorted(table)) for name, table in _TABLES.items()}
"""Preset name -> the budgets published for it (all for 50 steps)."""


def preset_schedule(name: str, budget: int) -> Schedule:
    """The published schedule ``name`` at ``budget`` computed steps out of 50."""
    if name not in _TABLES:
        raise ValueError(f"unknown schedule preset {name!r}; known presets: {sorted(_TABLES)}")
    if budget not in _TABLES[name]:
        raise ValueError(
            f"preset {name!r} has no schedule for budget {budget!r}; published budgets: {list(PRESETS[name])}"
        )
    runs, labels = _TABLES[name][budget]
    steps: list[int] = []
    for run in runs:
        steps.extend(range(run[0], run[1] + 1) if isinstance(run, tuple) else [run])
    spans = tuple(1 if label == "c" else int(label) for label in labels)
    metadata = {"preset": name, "model": name, "budget": budget, "num_steps": 50, "source": _SOURCE}
    return Schedule(50, tuple(steps), spans, metadata)
