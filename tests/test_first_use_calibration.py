"""Calibrate on first use, the calibration store, the third-party presets and the public API."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import meancache
from meancache import MeanCacheConfig, Schedule, disable_mean_cache, enable_mean_cache, summary
from meancache.calibration import (
    Calibration,
    CalibrationStore,
    calibrate,
    calibration_store,
    combine_calibrations,
    select_by_replay,
)
from meancache.calibration.store import key_digest
from meancache.cli.main import main
from meancache.integrations.diffusers import first_use
from meancache.integrations.diffusers import key as key_module
from meancache.integrations.diffusers.key import WeightsFingerprint, weights_fingerprint
from meancache.testing import generate_latents, tiny_inputs, tiny_pipeline

STEPS, BUDGET = 10, 4
REPO = Path(__file__).resolve().parents[1]
RANKS_FILE = REPO / "meancache" / "integrations" / "diffusers" / "ranks.py"
SHARED_SCHEDULES = REPO.parent / "shared" / "data" / "third_party_schedules.json"


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _source(pipe) -> str:
    return summary(pipe).schedule.metadata["source"]


def _key_of(pipe, inputs, steps=STEPS, seed=0, **kwargs) -> str:
    """The digest of the key a generation calibrates under (calibration never completes here)."""
    enable_mean_cache(pipe, MeanCacheConfig(budget=BUDGET, calibration_runs=99))
    try:
        generate_latents(pipe, inputs, steps, seed=seed, **kwargs)
        return re.search(r"key (\w+)", _source(pipe)).group(1)
    finally:
        disable_mean_cache(pipe)


def test_key_follows_trajectory_settings_not_prompt_or_seed(flux):
    inputs = tiny_inputs("flux")
    base = _key_of(flux, inputs)
    assert _key_of(flux, inputs, seed=5) == base
    assert _key_of(flux, tiny_inputs("flux", seed=3)) == base  # other prompt embeddings
    assert _key_of(flux, inputs, steps=12) != base
    assert _key_of(flux, tiny_inputs("flux", size=48)) != base
    assert _key_of(flux, inputs, guidance_scale=5.0) != base
    lora_scale = {s: _key_of(flux, inputs, joint_attention_kwargs={"scale": s}) for s in (0.5, 1.0)}
    assert lora_scale[0.5] != lora_scale[1.0]  # a LoRA's scale for the call
    weight = flux.transformer.proj_out.weight
    with torch.no_grad():
        weight.add_(1e-3)  # as a fused LoRA would
        try:
            assert _key_of(flux, inputs) != base
        finally:
            weight.sub_(1e-3)
    assert _key_of(flux, inputs) == base


def test_call_structure_ignores_values_sizes_and_batch():
    structure = key_module.call_structure
    per_sample = [torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)]
    call = {"x": per_sample, "cap_feats": [torch.zeros(5, 16), torch.zeros(9, 16)], "t": torch.ones(2), "mask": None}
    smaller = {"x": per_sample[:1], "cap_feats": [torch.zeros(3, 16)], "t": torch.ones(1), "mask": None}
    assert structure(call) == structure(smaller)
    assert structure(call) == {
        "cap_feats": ["tensor2:float32"], "mask": None, "t": "tensor1:float32", "x": ["tensor4:float32"]
    }  # fmt: skip
    assert structure({**smaller, "x": [[torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 4, 4)]]}) != structure(smaller)
    assert structure({**smaller, "mask": torch.ones(1, 5, dtype=torch.bool)}) != structure(smaller)
    lora = {**smaller, "joint_attention_kwargs": {"scale": 0.5}}
    assert structure(lora)["joint_attention_kwargs"] == {"scale": 0.5}
    assert structure(lora) != structure({**lora, "joint_attention_kwargs": {"scale": 1.0}})


def test_key_follows_the_weights_of_every_gated_model():
    """A ControlNet (like a second expert or a CFG branch's own model) shapes the trajectory: new weights in it
    must not reuse a calibration made with the old ones."""
    from tests.matrix import CASES

    (case,) = [c for c in CASES if c.name == "flux-controlnet"]
    pipe, inputs = case.build()
    pipe.set_progress_bar_config(disable=True)
    base = _key_of(pipe, inputs)
    with torch.no_grad():
        next(pipe.controlnet.parameters()).add_(1e-3)  # as a fused LoRA would
    assert _key_of(pipe, inputs) != base


class _AdapterLayer(torch.nn.Module):
    """The attributes of a PEFT tuner layer that adapter_settings reads (peft is not a dependency)."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = torch.nn.Linear(2, 2)
        self.scaling = {"style": 1.0, "other": 0.5}
        self.active_adapters = ["style"]
        self.merged_adapters: list[str] = []
        self.disable_adapters = False


def test_fingerprint_follows_adapter_scales_and_is_recomputed_only_on_change(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), _AdapterLayer())
    layer = model[1]
    base = weights_fingerprint(model)
    layer.scaling["style"] = 0.7  # set_adapters("style", 0.7)
    assert weights_fingerprint(model) != base
    layer.scaling["style"] = 1.0
    assert weights_fingerprint(model) == base
    layer.scaling["other"] = 2.0  # an inactive adapter's scale does not matter
    assert weights_fingerprint(model) == base
    for change, undo in [("active_adapters", ["style", "other"]), ("merged_adapters", ["style"]),
                         ("disable_adapters", True)]:  # fmt: skip
        saved = getattr(layer, change)
        setattr(layer, change, undo)
        assert weights_fingerprint(model) != base, change
        setattr(layer, change, saved)

    computed = []
    monkeypatch.setattr(key_module, "weights_fingerprint", lambda m: computed.append(m) or weights_fingerprint(m))
    cached = WeightsFingerprint()
    assert cached(model) == cached(model) == base and len(computed) == 1
    layer.scaling["style"] = 0.7
    assert cached(model) != base and len(computed) == 2
    with torch.no_grad():
        model[0].weight.add_(1.0)  # in place: the version counter moves
    cached(model)
    model[0].weight = torch.nn.Parameter(torch.zeros(2, 2))  # replaced
    cached(model)
    assert len(computed) == 4


def test_a_repeated_generation_reads_no_file_and_solves_nothing(flux, monkeypatch):
    inputs = tiny_inputs("flux")
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    try:
        generate_latents(flux, inputs, STEPS)  # calibrates
        calls: list[str] = []
        for module, name in [(key_module, "weights_fingerprint"), (first_use, "first_use_schedule")]:
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
        load = CalibrationStore.load
        monkeypatch.setattr(CalibrationStore, "load", lambda *a: calls.append("load") or load(*a))
        generate_latents(flux, inputs, STEPS, seed=1)  # the fingerprint is the calibrating generation's
        assert sorted(set(calls)) == ["first_use_schedule", "load"]
        calls.clear()
        generate_latents(flux, tiny_inputs("flux", seed=3), STEPS, seed=2)  # same key: another prompt and seed
        assert calls == [] and _source(flux).startswith("calibrated on first use")
        assert summary(flux).computed_steps == BUDGET
    finally:
        disable_mean_cache(flux)


def test_key_follows_true_cfg_scale():
    pipe = tiny_pipeline("qwen-image")
    pipe.set_progress_bar_config(disable=True)
    inputs = tiny_inputs("qwen-image")
    assert _key_of(pipe, inputs) != _key_of(pipe, {**inputs, "true_cfg_scale": 2.0})


def test_first_use_is_progressive_one_full_generation_then_the_budget(caplog):
    """With ``calibration_runs=2``: the first generation runs in full (bit-identical to the uncached pipeline) and
    calibrates, the next ``FULL_RUN_EVERY - 1`` run the budget with its schedule, the ``FULL_RUN_EVERY``-th runs in
    full again and adds the second generation, and from then on the budget runs with the complete calibration."""
    every = first_use.FULL_RUN_EVERY
    pipe = tiny_pipeline("qwen-image")  # true CFG: two transformer calls per evaluation
    pipe.set_progress_bar_config(disable=True)
    inputs = tiny_inputs("qwen-image")
    full = {seed: generate_latents(pipe, inputs, 12, seed=seed) for seed in (0, every)}
    enable_mean_cache(pipe, MeanCacheConfig(budget=5, calibration_runs=2))
    reports = []
    with caplog.at_level("WARNING", logger="meancache"):
        for seed in range(every + 2):
            latents = generate_latents(pipe, inputs, 12, seed=seed)
            reports.append(summary(pipe))
            if seed in full:
                assert torch.equal(latents, full[seed]) and reports[-1].computed_steps == 12
            else:
                assert (reports[-1].computed_steps, reports[-1].transformer_calls) == (5, 10)
    assert caplog.text.count("no schedule known") == 1
    sources = [report.schedule.metadata["source"] for report in reports]
    assert sources[0].startswith("calibrating on first use: generation 1 of 2")
    assert all(s.startswith("calibrated on first use (validated by replay, 1 generation of 2 so far") for s in
               sources[1:every]), sources  # fmt: skip
    assert sources[every].startswith("calibrating on first use: generation 2 of 2")
    assert sources[-1].startswith("calibrated on first use (validated by replay, 2 generations, ")
    assert max(reports[-1].schedule.spans) > 1  # average-velocity spans, not plain reuse
    (stored,) = calibration_store().files()
    assert Calibration.load(stored).trajectories == 2
    disable_mean_cache(pipe)
    enable_mean_cache(pipe, MeanCacheConfig(budget=7, calibration_runs=2))  # another budget: same costs and runs
    generate_latents(pipe, inputs, 12)
    assert summary(pipe).computed_steps == 7
    assert _source(pipe).startswith("calibrated on first use (validated by replay, 2 generations")
    assert set(Calibration.load(stored).metadata["selected"]) == {"5", "7"}  # complete: its selection is stored
    disable_mean_cache(pipe)


def test_the_store_counts_the_generations_a_provisional_calibration_served(tmp_path):
    """The count lives beside the calibration file, so a new process (one ``meancache generate`` each) goes on
    counting; saving the calibration again (a new generation observed) starts it again, and clearing removes it."""
    key = {"pipeline": "P", "checkpoint": "c", "sigmas": [1.0, 0.5, 0.0]}
    store = CalibrationStore(tmp_path)
    store.save(key, _tiny_calibration())
    for _ in range(3):
        store.set_uses(key, store.uses(key) + 1)
    assert CalibrationStore(tmp_path).uses(key) == 3  # another process
    store.save(key, _tiny_calibration())
    assert store.uses(key) == 0 and CalibrationStore(tmp_path).uses(key) == 0
    store.set_uses(key, 1)
    store.remove()
    assert CalibrationStore(tmp_path).uses(key) == 0 and list((tmp_path / "calibrations").iterdir()) == []
    memory = CalibrationStore(None)  # no home: counted in memory
    memory.set_uses(key, memory.uses(key) + 1)
    assert memory.uses(key) == 1


def test_the_store_keeps_the_recorded_runs_beside_the_calibration(tmp_path, caplog):
    """Each calibrating generation's recorded run is kept in ``<digest>.runs.pt``, so a later calibrating generation,
    in this process or another, replays the candidates on all of them; unreadable, it counts as none (warned), and
    clearing removes it."""
    key = {"pipeline": "P", "checkpoint": "c", "sigmas": [1.0, 0.5, 0.0]}
    store = CalibrationStore(tmp_path)
    store.save(key, _tiny_calibration())
    runs = [(torch.randn(2, 6).bfloat16(), torch.randn(2, 6).bfloat16()) for _ in range(2)]
    for run in runs:
        store.add_run(key, *run)
    path = tmp_path / "calibrations" / f"{key_digest(key)}.runs.pt"
    for kept in (store.runs(key), CalibrationStore(tmp_path).runs(key)):  # this process, another one
        assert len(kept) == 2 and all(torch.equal(a, b) for got, run in zip(kept, runs, strict=True)
                                      for a, b in zip(got, run, strict=True))  # fmt: skip
    for content in (b"not a tensor file", [[torch.zeros(2, 6)], [torch.zeros(3)]]):  # garbage; mismatched tensors
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        caplog.clear()
        with caplog.at_level("WARNING", logger="meancache"):
            assert CalibrationStore(tmp_path).runs(key) == []
        assert str(path) in caplog.text
    store.remove()
    assert list((tmp_path / "calibrations").iterdir()) == []
    memory = CalibrationStore(None)  # no home: kept in memory
    memory.add_run(key, *runs[0])
    assert len(memory.runs(key)) == 1 and CalibrationStore(None).runs(key) == []


def test_a_calibrating_generation_selects_on_every_recorded_run_of_its_key(flux, monkeypatch):
    """The second calibrating generation replays the candidates, under every selectable estimator, on both
    generations' runs: its stored pick is :func:`select_by_replay`'s on the two runs the store keeps, each the
    generation's latents and velocities (bfloat16)."""
    monkeypatch.setattr(first_use, "FULL_RUN_EVERY", 1)  # the second generation calibrates too
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=2))
    for seed in (0, 1):
        generate_latents(flux, tiny_inputs("flux", seed=seed), STEPS, seed=seed)
    disable_mean_cache(flux)
    (path,) = calibration_store().files()
    calibration = Calibration.load(path)
    key = calibration.metadata["key"]
    runs = calibration_store().runs(key)
    assert len(runs) == 2 and all(t.shape[0] == STEPS and t.dtype == torch.bfloat16 for run in runs for t in run)
    both = select_by_replay(calibration.candidate_schedules(BUDGET), [(*run, calibration.sigmas) for run in runs])
    last = select_by_replay(calibration.candidate_schedules(BUDGET), [(*runs[1], calibration.sigmas)])
    entry = calibration.metadata["selected"][str(BUDGET)]
    assert entry["replay_error"] == pytest.approx(both.metadata["replay_error"])
    assert entry["replay_error"] != pytest.approx(last.metadata["replay_error"])
    assert (entry["estimator"], entry["compute_steps"]) == (both.metadata["estimator"], list(both.compute_steps))


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_recorded_runs_are_replayed_on_the_generation_device(device, monkeypatch):
    """The runs are kept on the CPU (bfloat16) and replayed where the generation ran, for its own budget and for
    another budget asked for later."""
    pipe = tiny_pipeline("flux").to(device)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def recording(candidates, runs, refine=True):
        seen.extend(t.device.type for latents, velocities, _ in runs for t in (latents, velocities))
        return select_by_replay(candidates, runs, refine)

    monkeypatch.setattr(first_use, "select_by_replay", recording)
    for budget in (BUDGET, BUDGET + 1):
        enable_mean_cache(pipe, MeanCacheConfig(budget=budget, calibration_runs=1))
        generate_latents(pipe, tiny_inputs("flux"), STEPS)
        disable_mean_cache(pipe)
    (path,) = calibration_store().files()
    runs = calibration_store().runs(Calibration.load(path).metadata["key"])
    assert [t.device.type for t in runs[0]] == ["cpu", "cpu"]
    assert len(seen) == 4 and set(seen) == {device}  # the calibrating generation's pick, then the other budget's


def _tiny_calibration() -> Calibration:
    return meancache.calibrate(lambda z, sigma: -z, [torch.ones(2)], [1.0, 0.75, 0.5, 0.25, 0.0], max_gap=2,
                               max_span=1)  # fmt: skip


def test_first_use_measures_the_costs_meancache_calibrate_measures(flux, monkeypatch):
    """Calibrating on first use and ``meancache calibrate`` (``calibrate_pipeline``) are two routes to one
    measurement: on the same generations (two batches of two prompts, both calibrating) they store the same costs."""
    monkeypatch.setattr(first_use, "FULL_RUN_EVERY", 1)  # the second generation calibrates too
    seeds = (0, 1)
    calls = [{**tiny_inputs("flux", batch_size=2, seed=s), "generator": torch.Generator().manual_seed(s)}
             for s in seeds]  # fmt: skip
    offline = meancache.calibrate_pipeline(flux, calls, STEPS)
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=2))
    for seed in seeds:
        generate_latents(flux, tiny_inputs("flux", batch_size=2, seed=seed), STEPS, seed=seed)
    disable_mean_cache(flux)
    (stored,) = calibration_store().files()
    online = Calibration.load(stored)
    assert (online.max_gap, online.max_span) == (offline.max_gap, offline.max_span)
    np.testing.assert_allclose(online.sigmas, offline.sigmas, atol=1e-6)  # the key's sigmas: rounded to 6 decimals
    for kind in ("one_shot", "closed_loop"):
        np.testing.assert_allclose(getattr(online, kind), getattr(offline, kind), rtol=1e-5, err_msg=kind)


def test_calibration_runs_zero_is_the_uniform_fallback_and_stores_nothing(flux):
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=0))
    generate_latents(flux, tiny_inputs("flux"), STEPS)
    assert _source(flux) == "fallback: uniform, K=1"
    disable_mean_cache(flux)
    assert calibration_store().files() == []
    with pytest.raises(ValueError, match=r"calibration_runs must be an integer >= 0.*-1"):
        MeanCacheConfig(budget=5, calibration_runs=-1)


@pytest.mark.parametrize(
    "content", ["{not json", "truncated", '{"num_steps": 10, "compute_steps": [0, 9]}', "other key"]
)
def test_unusable_store_files_are_warned_about_and_recalibrated(flux, tmp_path, monkeypatch, caplog, content):
    inputs = tiny_inputs("flux")
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    generate_latents(flux, inputs, STEPS)
    disable_mean_cache(flux)
    (path,) = calibration_store().files()
    valid = path.read_text()
    if content == "truncated":
        content = valid[: len(valid) // 2]
    elif content == "other key":
        data = json.loads(valid)
        data["metadata"]["key"]["checkpoint"] = "someone/else"
        content = json.dumps(data)
    monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / "home"))  # a store this process has not seen
    (tmp_path / "home" / "calibrations").mkdir(parents=True)
    broken = tmp_path / "home" / "calibrations" / path.name
    broken.write_text(content)
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    with caplog.at_level("WARNING", logger="meancache"):
        generate_latents(flux, inputs, STEPS)
    assert str(broken) in caplog.text
    assert _source(flux).startswith("calibrating on first use")
    generate_latents(flux, inputs, STEPS)
    assert _source(flux).startswith("calibrated on first use")
    disable_mean_cache(flux)
    assert Calibration.load(broken).trajectories == 1


def test_unwritable_home_keeps_calibrations_in_memory_with_one_warning(flux, tmp_path, monkeypatch, caplog):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / "a file" / "home"))  # cannot be created (even by root)
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    with caplog.at_level("WARNING", logger="meancache"):
        for _ in range(3):
            generate_latents(flux, tiny_inputs("flux"), STEPS)
    assert caplog.text.count("cannot write calibrations") == 1
    assert summary(flux).computed_steps == BUDGET and "kept in memory" in _source(flux)
    disable_mean_cache(flux)


_WORKER = textwrap.dedent("""
    from meancache import Calibration, MeanCacheConfig, calibration_store, enable_mean_cache, summary
    from meancache.testing import generate_latents, tiny_inputs, tiny_pipeline

    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(pipe, MeanCacheConfig(budget={budget}, calibration_runs=1))
    generate_latents(pipe, tiny_inputs("flux"), {steps})
    report = summary(pipe)
    print(report.transformer_calls, report.schedule.metadata["source"])
    store = calibration_store()
    (path,) = store.files()
    calibration = Calibration.load(path)
    for _ in range(25):  # both workers rewrite the key at once
        store.save(calibration.metadata["key"], calibration)
""").format(budget=BUDGET, steps=STEPS)


def _python(code: str, *args: str) -> subprocess.Popen:
    """A new Python process running ``code`` with ``args``, this checkout importable, output captured."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip


def test_new_processes_find_the_stored_calibration_and_write_it_safely(flux):
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    generate_latents(flux, tiny_inputs("flux"), STEPS)
    disable_mean_cache(flux)
    workers = [_python(_WORKER) for _ in range(2)]
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        calls, source = out.strip().splitlines()[-1].split(" ", 1)
        assert int(calls) == BUDGET, out
        assert source.startswith("calibrated on first use (validated by replay, 1 generation,"), out
    (path,) = calibration_store().files()
    assert Calibration.load(path).trajectories == 1
    kept = sorted(p.name for p in path.parent.iterdir())  # no temporary files left
    assert kept == [path.name, path.with_suffix(".runs.pt").name]


def test_store_round_trip_and_combination(tmp_path):
    costs = np.full((4, 4, 2), np.inf)
    costs[0, 2], costs[1, 3] = (1.0, 2.0), (3.0, 4.0)
    first = Calibration([1.0, 0.75, 0.5, 0.25, 0.0], 2, 2, costs, costs * 2, 1)
    second = Calibration([1.0, 0.75, 0.5, 0.25, 0.0], 2, 2, costs * 4, costs * 8, 3)
    combined = combine_calibrations(first, second)
    assert combined.trajectories == 4
    assert combined.one_shot[0, 2, 0] == pytest.approx((1.0 + 3 * 4.0) / 4) and np.isinf(combined.one_shot[0, 1, 0])
    store = CalibrationStore(tmp_path)
    key = {"pipeline": "P", "sigmas": [1.0, 0.0]}
    path = store.save(key, combined)
    assert path == tmp_path / "calibrations" / f"{key_digest(key)}.json"
    loaded = CalibrationStore(tmp_path).load(key)
    assert loaded.trajectories == 4 and np.array_equal(loaded.closed_loop, combined.closed_loop)
    assert CalibrationStore(tmp_path).load({**key, "pipeline": "Q"}) is None


def test_the_store_reads_a_file_again_only_once_it_changed(tmp_path):
    """Every generation of a key resolves its calibration; the file is parsed again only when another process (or
    this one) rewrote it, and the text written is what ``json.dumps`` makes of the nested cost lists."""
    key = {"pipeline": "P", "checkpoint": "c", "sigmas": [1.0, 0.5, 0.0]}
    writer, reader = CalibrationStore(tmp_path), CalibrationStore(tmp_path)
    path = writer.save(key, _tiny_calibration())
    first = reader.load(key)
    assert reader.load(key) is first
    grown = combine_calibrations(first, _tiny_calibration())
    writer.save(key, grown)  # another process grows the calibration
    again = reader.load(key)
    assert again is not first and again.trajectories == 2
    nested = np.where(np.isfinite(grown.closed_loop), grown.closed_loop, np.nan).tolist()
    assert f'"closed_loop": {json.dumps(nested).replace("NaN", "null")}}}' in path.read_text()


def test_calibrations_command_lists_and_clears(flux, capsys):
    enable_mean_cache(flux, MeanCacheConfig(budget=BUDGET, calibration_runs=1))
    generate_latents(flux, tiny_inputs("flux"), STEPS)
    generate_latents(flux, tiny_inputs("flux"), 12)
    disable_mean_cache(flux)
    assert main(["calibrations", "list"]) == 0
    out = capsys.readouterr().out
    assert "2 calibration(s)" in out and "FluxPipeline" in out and "10 steps" in out and "12 steps" in out
    first = calibration_store().files()[0].stem
    assert main(["calibrations", "clear", "zzzz"]) == 2  # refused, nothing deleted (#25)
    assert "matches no stored calibration" in capsys.readouterr().err
    main(["calibrations", "clear", first[:6]])
    assert [p.stem for p in calibration_store().files()] != [first] and len(calibration_store().files()) == 1
    main(["calibrations", "clear"])
    assert calibration_store().files() == []


@pytest.mark.skipif(not SHARED_SCHEDULES.exists(), reason="the shared third-party data file is not present")
def test_third_party_presets_equal_the_shared_data_file():
    rows = json.loads(SHARED_SCHEDULES.read_text())["schedules"]
    calibrated = [r for r in rows if "globalspan" not in r["id"]]
    assert len(calibrated) == 12
    for row in calibrated:
        schedule = Schedule.preset(row["model"], row["budget"])
        assert (schedule.compute_steps, schedule.spans) == (tuple(row["compute_steps"]), tuple(row["spans"]))
        assert schedule.metadata["provenance"]["id"] == row["id"] and "MIT" in schedule.metadata["source"]
    assert set(meancache.PRESETS["flux.1-dev"]) == {9, 13, 21}


def test_third_party_preset_is_resolved_for_flux_1_dev_only(tmp_path):
    from meancache.schedule.defaults import default_schedule

    flux_dev = default_schedule("FluxPipeline", "black-forest-labs/FLUX.1-dev", 50, 13, "FluxTransformer2DModel")
    assert flux_dev == Schedule.preset("flux.1-dev", 13) and "third-party" in flux_dev.metadata["source"]
    schnell = default_schedule("FluxPipeline", "black-forest-labs/FLUX.1-schnell", 50, 13, "FluxTransformer2DModel")
    assert schnell.metadata["source"] == "fallback: uniform, K=1"


def test_readme_names_are_importable_from_meancache():
    names = ["MeanCacheConfig", "Schedule", "PRESETS", "enable_mean_cache", "disable_mean_cache", "summary", "sample",
             "solve_pssp", "calibrate", "Calibration", "calibrate_pipeline", "select_schedule", "CalibrationStore",
             "calibration_store", "enable_jvp_attention", "disable_jvp_attention", "load_digits_model"]  # fmt: skip
    for name in names:
        assert getattr(meancache, name) is not None and name in meancache.__all__


_RANK = textwrap.dedent("""
    import importlib.util
    import sys
    import torch.distributed as dist

    # ranks.py needs only torch: load it alone, without importing diffusers through meancache/__init__
    spec = importlib.util.spec_from_file_location("ranks", sys.argv[3])
    ranks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ranks)
    decide_on_rank_zero = ranks.decide_on_rank_zero

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    print(decide_on_rank_zero(lambda: f"decided by rank {rank}"))
    try:
        decide_on_rank_zero(lambda: 1 / 0)
    except ZeroDivisionError:
        print("raised")
    dist.destroy_process_group()
""")


def test_every_rank_takes_rank_zeros_decision(tmp_path):
    ranks = [_python(_RANK, str(r), str(tmp_path / "rendezvous"), str(RANKS_FILE)) for r in range(2)]
    for process in ranks:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert out.split()[-5:] == ["decided", "by", "rank", "0", "raised"], out


def test_a_spaced_pick_is_stored_and_served(monkeypatch):
    """A pick among the spaced candidates (no ``gamma``, a ``spacing_power``) is stored and served like a PSSP one."""
    n = 50
    calibration = calibrate(lambda z, sigma: -z, [torch.randn(4)], torch.linspace(1.0, 0.0, n + 1).tolist(), 8, 3)
    spaced = calibration.spaced_candidates(25)[2]
    picked = Schedule(n, spaced.compute_steps, spaced.spans, {**spaced.metadata, "replay_error": 0.1,
                      "replay_candidates": 30, "replay_moves": 0, "estimator": "paper"})  # fmt: skip
    monkeypatch.setattr(first_use, "select_by_replay", lambda candidates, runs, refine: picked)
    first_use.select_for_budget(calibration, 25, [], refine=True)
    served = first_use.first_use_schedule(calibration, 25)
    assert (served.compute_steps, served.spans) == (spaced.compute_steps, spaced.spans)
    assert served.metadata["spacing_power"] == 1.5 and "gamma" not in served.metadata
