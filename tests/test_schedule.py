import json
import re

import pytest

from meancache import PRESETS, Schedule


@pytest.mark.parametrize(("name", "budget"), [(n, b) for n, budgets in PRESETS.items() for b in budgets])
def test_published_presets_are_valid_50_step_schedules(name, budget):
    schedule = Schedule.preset(name, budget)
    assert schedule.num_steps == 50
    assert schedule.budget == budget
    assert schedule.compute_steps[0] == 0 and schedule.compute_steps[-1] == 49
    assert 1 <= schedule.max_span <= 5
    assert schedule.metadata["preset"] == name


def test_preset_tables_match_the_published_text():
    qwen10 = Schedule.preset("qwen-image", 10)
    assert qwen10.compute_steps == (0, 1, 3, 7, 14, 21, 28, 35, 42, 49)
    assert qwen10.spans == (1, 2, 1, 1, 1, 1, 1, 1, 4)
    assert [qwen10.span(i) for i in (2, 5, 45)] == [2, 1, 4]
    z13 = Schedule.preset("z-image", 13)
    assert z13.compute_steps == (0, 1, 2, 3, 5, 9, 15, 22, 29, 36, 43, 47, 49)
    assert z13.span(44) == 5 and z13.span(48) == 2


def test_unknown_preset_and_budget_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown schedule preset 'flux'.*qwen-image"):
        Schedule.preset("flux", 10)
    with pytest.raises(ValueError, match=r"no schedule for budget 11.*\[9, 10, 13, 17, 21, 25\]"):
        Schedule.preset("qwen-image", 11)


@pytest.mark.parametrize(
    ("steps", "compute", "spans", "message"),
    [
        (10, (0, 5, 3, 9), (1, 1, 1), "strictly increasing, but 3 follows 5"),
        (10, (0, 5, 5, 9), (1, 1, 1), "strictly increasing, but 5 follows 5"),
        (10, (0, 5, 12), (1, 1), r"out of range for 10 steps \(allowed: 0..9\)"),
        (10, (1, 5, 9), (1, 1), "step 0 must be computed"),
        (10, (0, 5, 8), (1, 1), r"last step \(9\) must be computed"),
        (10, (0, 5, 9), (1, 0), r"spans must be in \[1, 10\] for 10 steps.*got \[0\]"),
        (10, (0, 9), (20000,), r"spans must be in \[1, 10\] for 10 steps.*got \[20000\]"),  # item 11
        (10, (0, 9), (10**9,), r"spans must be in \[1, 10\].*got \[1000000000\]"),
        (2_000_000_000, (0,), (), r"num_steps must be an integer in \[1, 10000\], got 2000000000"),  # item 10
        (10, (0, 5, 9), (1,), "2 for 3 computed steps, got 1"),
        (0, (0,), (), r"num_steps must be an integer in \[1, 10000\], got 0"),
        (10, (), (), "compute_steps is empty"),
    ],
)
def test_bad_schedules_get_clear_errors(steps, compute, spans, message):
    with pytest.raises(ValueError, match=message):
        Schedule(steps, compute, spans)


def test_non_integer_steps_are_rejected():
    with pytest.raises(TypeError, match=r"compute_steps must hold integers, got 2.5"):
        Schedule(10, (0, 2.5, 9), (1, 1))
    with pytest.raises(TypeError, match=r"compute_steps must be a sequence of integers, got None"):  # item 8
        Schedule(10, None, ())
    with pytest.raises(TypeError, match=r"spans must be a sequence of integers, got '11'"):
        Schedule(10, (0, 9), "11")
    with pytest.raises(TypeError, match=r"metadata must be a dict \(a JSON object\), got 'x' \(str\)"):
        Schedule(10, (0, 9), (1,), "x")


def test_per_step_view():
    schedule = Schedule(10, (0, 1, 5, 9), (7, 3, 2))
    assert [schedule.is_computed(i) for i in range(10)] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert [schedule.span(i) for i in range(10)] == [0, 0, 3, 3, 3, 0, 2, 2, 2, 0]
    assert schedule.max_span == 3  # the span 7 of the unit interval 0 -> 1 is never used
    assert schedule.ideal_speedup == 2.5


def test_json_round_trip_keeps_metadata(tmp_path):
    schedule = Schedule.preset("qwen-image-2512", 17)
    path = tmp_path / "schedule.json"
    schedule.save(path)
    data = json.loads(path.read_text())
    assert data["budget"] == 17 and data["num_steps"] == 50 and data["metadata"]["model"] == "qwen-image-2512"
    loaded = Schedule.load(path)
    assert loaded == schedule and loaded.metadata == schedule.metadata


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"is not a schedule JSON file"):
        Schedule.load(bad)
    bad.write_text(json.dumps({"num_steps": 10, "compute_steps": [0, 9]}))
    with pytest.raises(ValueError, match=r"lacks the keys \['spans'\]"):
        Schedule.load(bad)
    bad.write_text(json.dumps({"num_steps": 10, "compute_steps": [0, 9], "spans": [1], "budget": 3}))
    with pytest.raises(ValueError, match=r"says budget 3 but lists 2"):
        Schedule.load(bad)


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ('{"num_steps": 10, "compute_steps": [0, 9], "spans": [1], "metadata": "x"}', TypeError,
         r"metadata must be a dict \(a JSON object\), got 'x'"),  # item 8
        ('{"num_steps": 10, "compute_steps": [0, 9], "spans": [1], "metadata": null}', TypeError,
         r"metadata must be a dict \(a JSON object\), got None"),
        ('{"num_steps": 2000000000, "compute_steps": [0], "spans": []}', ValueError,
         r"num_steps must be an integer in \[1, 10000\], got 2000000000"),  # item 10: no huge list is built
        ('{"num_steps": 10, "compute_steps": [0, 9], "spans": [1000000000]}', ValueError,
         r"spans must be in \[1, 10\]"),  # item 11
        (b"\xff\xfe{}", ValueError, r"is not a schedule JSON file.*utf-8"),  # item 9
    ],
)  # fmt: skip
def test_load_names_the_file_and_the_bad_value(tmp_path, content, error, message):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error, match=re.escape(repr(str(bad))) + ".*" + message):
        Schedule.load(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        Schedule.load(tmp_path / "missing.json")


def test_for_steps_maps_in_sigma_space_keeping_budget_and_spans():
    schedule = Schedule.preset("qwen-image", 10)
    assert schedule.for_steps(50) is schedule
    mapped = schedule.for_steps(28)
    assert mapped.num_steps == 28 and mapped.budget == 10 and mapped.spans == schedule.spans
    # each computed step keeps its position i / (N - 1) to within one step
    for c50, c28 in zip(schedule.compute_steps, mapped.compute_steps, strict=True):
        assert abs(c28 - c50 * 27 / 49) <= 1
    assert mapped.metadata["mapped_from_steps"] == 50
    dense = Schedule.preset("qwen-image", 25).for_steps(25)  # every step computed, still distinct
    assert dense.compute_steps == tuple(range(25))


def test_for_steps_refuses_fewer_steps_than_the_budget():
    with pytest.raises(ValueError, match=r"budget 10 .* cannot run 9 steps"):
        Schedule.preset("qwen-image", 10).for_steps(9)
    with pytest.raises(ValueError, match=r"a 1-step schedule cannot be mapped to 10 steps"):  # item 19
        Schedule(1, (0,), ()).for_steps(10)
    with pytest.raises(ValueError, match=r"cannot run 20000 steps: .* in \[10, 10000\]"):
        Schedule.preset("qwen-image", 10).for_steps(20000)


def test_uniform():
    schedule = Schedule.uniform(50, 10, span=3)
    assert schedule.budget == 10 and schedule.compute_steps[-1] == 49 and set(schedule.spans) == {3}
    with pytest.raises(ValueError, match=r"budget must be an integer in \[2, 50\]"):
        Schedule.uniform(50, 51)


def test_a_corrupt_shipped_schedule_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    """Item 12 of issue #15: one bad file in <model>/meancache_schedules/ no longer breaks every budget."""
    from meancache.schedule.defaults import SHIPPED_SCHEDULES_DIR, default_schedule

    shipped = tmp_path / SHIPPED_SCHEDULES_DIR
    shipped.mkdir()
    (shipped / "a_corrupt.json").write_text('{"num_steps": 20, "compute_steps": [0, 19], "spans": [99]}')
    Schedule(20, (0, 5, 12, 19), (2, 1, 3), {"source": "shipped"}).save(shipped / "b.json")
    with caplog.at_level("WARNING", logger="meancache.schedule.defaults"):
        schedule = default_schedule("FluxPipeline", str(tmp_path), 20, 4, "FluxTransformer2DModel")
    assert schedule.metadata["source"] == "shipped"
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "a_corrupt.json" in record.getMessage() and "spans must be in [1, 20]" in record.getMessage()
