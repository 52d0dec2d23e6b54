"""50-step schedules for real models: the MeanCache authors' published tables and an independent group's.

* The authors' scripts (``calc_dict`` / ``edge_source``): Qwen-Image, Qwen-Image-2512, Z-Image. Each table is
  written as the authors list it: computed steps as runs (``(a, b)`` is ``a..b`` inclusive), and one label per
  interval between consecutive computed steps: ``"c"`` for a unit interval (nothing skipped; stored as span 1)
  or the look-back span ``K``.
* ``third_party_schedules.json`` (MIT, Golden Path Hypothesis authors; notice, provenance and caveats inside):
  MeanCache schedules calibrated on FLUX.1-dev, Qwen-Image, HunyuanVideo and Wan2.1 at budgets 9, 13 and 21.
  Each schedule's metadata carries its source, settings and calibration; the caveats (HunyuanVideo and Wan2.1
  ran through the official samplers, Wan2.1 with UniPC) are in ``metadata["caveats"]``.

The two never publish the same model and budget, so one name holds both (``"qwen-image"``: 9, 10, 13, 17, 21, 25).

This module holds the tables as plain data (:func:`preset_parts`); :meth:`meancache.Schedule.preset` makes the
schedule, so the schedule type does not depend on its presets and the presets not on the type.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

THIRD_PARTY_FILE = Path(__file__).with_name("third_party_schedules.json")

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


PresetParts = tuple[int, tuple[int, ...], tuple[int, ...], dict[str, Any]]
"""A preset as the arguments of :class:`~meancache.Schedule`: step count, computed steps, spans, metadata."""


@functools.cache
def third_party_schedules() -> dict[str, dict[int, PresetParts]]:
    """Model name -> budget -> schedule parts, from ``third_party_schedules.json``."""
    data = json.loads(THIRD_PARTY_FILE.read_text(encoding="utf-8"))
    source = data["source"]
    origin = f"{source['repository']}@{source['commit'][:8]}"
    tables: dict[str, dict[int, PresetParts]] = {}
    for row in data["schedules"]:
        provenance: dict[str, Any] = {k: row[k] for k in ("id", "source_label", "variant", "settings", "calibration")}
        metadata = {
            "preset": row["model"], "model": row["model"], "budget": row["budget"], "num_steps": row["num_steps"],
            "source": f"third-party calibration ({origin}, {source['license']}), {row['source_label']}",
            "provenance": {**provenance, "repository": source["repository"], "commit": source["commit"],
                           "file": row["source_file"]},
            "caveats": data["caveats"],
        }  # fmt: skip
        parts = (row["num_steps"], tuple(row["compute_steps"]), tuple(row["spans"]), metadata)
        tables.setdefault(row["model"], {})[row["budget"]] = parts
    return tables


def _budgets() -> dict[str, tuple[int, ...]]:
    names = {name: set(table) for name, table in _TABLES.items()}
    for name, table in third_party_schedules().items():
        names.setdefault(name, set()).update(table)
    return {name: tuple(sorted(budgets)) for name, budgets in names.items()}


PRESETS: dict[str, tuple[int, ...]] = _budgets()
"""Preset name -> the budgets with a schedule (all for 50 steps; the authors' and the third-party ones)."""


def preset_parts(name: str, budget: int) -> PresetParts:
    """The published schedule ``name`` at ``budget`` computed steps out of 50, as :class:`~meancache.Schedule`'s
    arguments (:meth:`meancache.Schedule.preset` makes it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown schedule preset {name!r}; known presets: {sorted(PRESETS)}")
    if budget not in PRESETS[name]:
        raise ValueError(
            f"preset {name!r} has no schedule for budget {budget!r}; published budgets: {list(PRESETS[name])}"
        )
    if budget not in _TABLES.get(name, {}):
        return third_party_schedules()[name][budget]
    runs, labels = _TABLES[name][budget]
    steps: list[int] = []
    for run in runs:
        steps.extend(range(run[0], run[1] + 1) if isinstance(run, tuple) else [run])
    spans = tuple(1 if label == "c" else int(label) for label in labels)
    metadata = {"preset": name, "model": name, "budget": budget, "num_steps": 50, "source": _SOURCE}
    return 50, tuple(steps), spans, metadata
