import collections
import itertools
import json
import re

import numpy as np
import pytest
import torch

from meancache import MeanCacheConfig, Schedule, disable_mean_cache, summary
from meancache.calibration import (
    AGGREGATES,
    CANDIDATE_GAMMAS,
    COST_KINDS,
    Calibration,
    StabilityCostAccumulator,
    calibrate,
    costs,
    replay,
    replay_error,
    replay_estimator_error,
    select_by_replay,
    select_estimator_by_replay,
)
from meancache.calibration.replay import replay_errors, replay_sample
from meancache.integrations.diffusers import calibrate_pipeline, enable_mean_cache, select_estimator, select_schedule
from meancache.integrations.diffusers.calibration import observe_steps
from meancache.integrations.diffusers.first_use import first_use_schedule
from meancache.method.estimators import (
    ESTIMATORS,
    HISTORY_DTYPE,
    SELECTABLE,
    DataLinearEstimator,
    ExactJVPEstimator,
    PaperRuleEstimator,
    TrajectoryExtrapolationEstimator,
)
from meancache.ops import average_velocity_step
from meancache.schedule.pssp import solve_pssp
from meancache.testing import tiny_inputs, tiny_pipeline
from tests.matrix import CASES
from tests.reference_loop import ReferenceMeanCache, toy_velocity

N, MAX_GAP, MAX_SPAN = 14, 5, 3


def _trajectory(z, sigmas):
    zs, vs = [], []
    for i in range(len(sigmas) - 1):
        v = toy_velocity(z, sigmas[i])
        zs.append(z)
        vs.append(v)
        z = z + (sigmas[i + 1] - sigmas[i]) * v
    return zs, vs


def _expected_costs(zs, vs, sigmas):
    """Both cost kinds from the whole stored trajectory, written from the definitions."""
    n = len(zs)
    one_shot = np.full((n, n, MAX_SPAN), np.inf)
    closed = np.full((n, n, MAX_SPAN), np.inf)
    s = sigmas
    for i in range(n):
        for j in range(i + 2, min(i + MAX_GAP, n - 1) + 1):
            u = (zs[j] - zs[i]) / (s[j] - s[i])
            for K in range(1, MAX_SPAN + 1):
                k = min(K, i)
                jvp = 0 if k == 0 else ((zs[i] - zs[i - k]) / (s[i] - s[i - k]) - vs[i - k]) / (s[i] - s[i - k])
                u_hat = vs[i] + (s[j] - s[i]) * jvp
                one_shot[i, j, K - 1] = (u_hat - u).abs().mean().item()
                # closed loop: the reference rule with the reference history, computing i, skipping to j
                ref = ReferenceMeanCache(s, (*range(i + 1), j), (1,) * i + (K,))
                z = zs[0]
                for t in range(j):
                    v = ref.velocity(t, z if t > i else zs[t], vs[t] if t <= i else None)
                    z = (zs[t] if t <= i else z) + (s[t + 1] - s[t]) * v
                closed[i, j, K - 1] = ((z - zs[i]) / (s[j] - s[i]) - u).abs().mean().item()
    return one_shot, closed


def test_costs_match_the_definitions_on_two_trajectories():
    sigmas = torch.linspace(1.0, 0.0, N + 1).tolist()
    starts = [torch.randn(3, 7, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    cal = calibrate(toy_velocity, starts, sigmas, max_gap=MAX_GAP, max_span=MAX_SPAN)
    assert cal.trajectories == 2 and cal.one_shot.shape == (N, N, MAX_SPAN)
    expected = [_expected_costs(*_trajectory(z, sigmas), sigmas) for z in starts]
    for got, kind in ((cal.one_shot, 0), (cal.closed_loop, 1)):
        mean = (expected[0][kind] + expected[1][kind]) / 2
        assert np.array_equal(np.isfinite(got), np.isfinite(mean))
        np.testing.assert_allclose(got[np.isfinite(got)], mean[np.isfinite(mean)], rtol=1e-4, atol=1e-6)
    # span 1 is plain reuse in both kinds, and they agree on the shortest edges
    np.testing.assert_allclose(np.diagonal(cal.one_shot[:, 2:, 0]), np.diagonal(cal.closed_loop[:, 2:, 0]), rtol=1e-5)
    # the closed-loop rule is not the one-shot estimate (the paper's cost scores something else)
    finite = np.isfinite(cal.one_shot[..., 2])
    assert not np.allclose(cal.one_shot[..., 2][finite], cal.closed_loop[..., 2][finite], rtol=1e-3)


def test_max_aggregate_takes_the_worst_trajectory():
    sigmas = torch.linspace(1.0, 0.0, N + 1).tolist()
    starts = [torch.randn(2, 5, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    one = [calibrate(toy_velocity, [z], sigmas, MAX_GAP, MAX_SPAN).closed_loop for z in starts]
    worst = calibrate(toy_velocity, starts, sigmas, MAX_GAP, MAX_SPAN, aggregate="max").closed_loop
    np.testing.assert_allclose(worst, np.maximum.reduce(one), rtol=1e-6)


def test_memory_is_a_bounded_window():
    sigmas = torch.linspace(1.0, 0.0, 61).tolist()
    acc = StabilityCostAccumulator(sigmas, max_gap=6, max_span=2)
    z = torch.randn(4)
    for i in range(60):
        v = toy_velocity(z, sigmas[i])
        acc.add_step(i, z, v)
        assert len(acc._window) <= 6 + 2 + 1
        z = z + (sigmas[i + 1] - sigmas[i]) * v
    assert acc.trajectories == 1


def test_save_load_round_trip_and_schedules(tmp_path):
    sigmas = torch.linspace(1.0, 0.0, N + 1).tolist()
    cal = calibrate(toy_velocity, [torch.randn(4)], sigmas, MAX_GAP, MAX_SPAN, metadata={"model": "toy"})
    path = tmp_path / "calibration.json"
    cal.save(path)
    loaded = Calibration.load(path)
    for kind in ("one-shot", "closed-loop"):
        np.testing.assert_array_equal(loaded.costs(kind), cal.costs(kind))
    assert loaded.metadata["model"] == "toy" and loaded.sigmas == cal.sigmas and loaded.trajectories == 1
    schedule = loaded.schedule(6, kind="closed-loop", gamma=2.0)
    assert schedule.budget == 6 and schedule.num_steps == N
    assert all(b - a <= MAX_GAP for a, b in itertools.pairwise(schedule.compute_steps))
    assert schedule.metadata["cost_kind"] == "closed-loop" and schedule.metadata["model"] == "toy"


def test_candidate_schedules_cover_the_solver_grid():
    sigmas = torch.linspace(1.0, 0.0, N + 1).tolist()
    cal = calibrate(toy_velocity, [torch.randn(4)], sigmas, MAX_GAP, MAX_SPAN, metadata={"model": "toy"})
    candidates = cal.candidate_schedules(6)
    keys = {(c.compute_steps, c.spans) for c in candidates}
    assert len(keys) == len(candidates)  # no duplicates
    for gap, span, gamma in itertools.product((3, 4, 5), (3,), CANDIDATE_GAMMAS):
        solved = cal.without_step_0_anchor(solve_pssp(cal.costs()[..., :span], 6, gamma=gamma, max_gap=gap), span)
        assert (solved.compute_steps, solved.spans) in keys
    assert all(c.budget == 6 and c.metadata["model"] == "toy" for c in candidates)
    assert all(max(b - a for a, b in itertools.pairwise(c.compute_steps)) <= c.metadata["max_gap"] for c in candidates)
    with pytest.raises(ValueError, match="no schedule with 2 computed steps bridges gaps of at most 5"):
        cal.candidate_schedules(2)


def test_no_look_back_of_a_schedule_from_costs_anchors_at_step_0():
    n = 8
    closed_loop = np.ones((n, n, 3))
    closed_loop[..., 1], closed_loop[..., 2] = 0.5, 0.25  # the longest span is cheapest everywhere
    closed_loop[1, 4] = (0.4, 0.3, 0.2)
    cal = Calibration(np.linspace(1.0, 0.0, n + 1).tolist(), 4, 3, closed_loop.copy(), closed_loop, 1)
    # after step 1 only plain reuse (span 2 would anchor step 2's look-back at step 0); after step c, span <= c
    capped = cal.without_step_0_anchor(Schedule(n, (0, 1, 4, 7), (1, 3, 3)), 3)
    assert capped.spans == (1, 1, 3)
    assert capped.metadata["worst_edge_cost"] == 0.4 and capped.metadata["total_edge_cost"] == 0.4 + 0.25
    assert cal.without_step_0_anchor(Schedule(n, (0, 2, 5, 7), (3, 3, 3)), 3).spans == (1, 2, 3)
    assert cal.without_step_0_anchor(Schedule(n, (0, 3, 7), (2, 3)), 3).spans == (1, 3)
    candidates = cal.candidate_schedules(4)
    for schedule in [*candidates, first_use_schedule(cal, 4)]:
        intervals = zip(itertools.pairwise(schedule.compute_steps), schedule.spans, strict=True)
        assert all(k <= max(c, 1) for (c, j), k in intervals if j > c + 1), schedule
    assert any(k == 3 for c in candidates for k in c.spans)


def test_candidate_schedules_include_the_shortest_bridging_gap():
    sigmas = torch.linspace(1.0, 0.0, N + 1).tolist()
    cal = calibrate(toy_velocity, [torch.randn(4)], sigmas, MAX_GAP, MAX_SPAN)
    # budget 8 over 13 intervals bridges gaps of 2 (ceil(13 / 7)), below the grid's 3..5
    assert any(c.metadata["max_gap"] == 2 for c in cal.candidate_schedules(8))


def test_candidate_schedules_include_spaced_schedules_that_keep_steps_0_and_1():
    n = 50
    sigmas = torch.linspace(1.0, 0.0, n + 1).tolist()
    cal = calibrate(toy_velocity, [torch.randn(4)], sigmas, 8, 3)
    keys = {c.compute_steps for c in cal.candidate_schedules(25)}
    spaced = cal.spaced_candidates(25)
    assert [c.metadata["spacing_power"] for c in spaced] == [1.0, 1.25, 1.5, 2.0]
    # p = 1.5: steps 0 and 1, then 2 + round(47 (k / 22)^1.5) for k = 0..22, each at least one past the one before
    assert spaced[2].compute_steps == (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 14, 16, 19, 21, 23, 26, 28, 31, 34, 37, 40,
                                       43, 46, 49)  # fmt: skip
    for schedule in spaced:
        steps = schedule.compute_steps
        assert steps in keys and steps[:3] == (0, 1, 2) and steps[-1] == n - 1 and schedule.budget == 25
        assert schedule.spans[0] == 1 and set(schedule.spans[1:]) <= {1, 2, 3}  # no look-back anchored at step 0
        assert max(b - a for a, b in itertools.pairwise(steps)) == schedule.metadata["max_gap"] <= 8
    first_half = [sum(s < n // 2 for s in c.compute_steps) for c in spaced]
    assert first_half == sorted(first_half) and first_half[-1] > first_half[0]  # denser early as p grows
    assert cal.spaced_candidates(3) == [] and cal.spaced_candidates(8) == []  # too few steps; gaps above 8


def test_replay_error_is_the_drift_of_the_replayed_run():
    sigmas = torch.linspace(1.0, 0.0, 4).tolist()
    latents, velocities = _trajectory(torch.randn(3, 4), sigmas)
    assert replay_error(Schedule(3, (0, 1, 2), (1, 1)), latents, velocities, sigmas) == pytest.approx(0.0, abs=1e-7)
    # step 1 skipped with plain reuse: z_hat_2 = z_1 + (s2 - s1) v_0 is off by (s2 - s1)(v_0 - v_1), and step 2
    # (computed, with the recorded v_2) carries that offset to z_hat_3
    offset = float(((sigmas[2] - sigmas[1]) * (velocities[0] - velocities[1])).abs().mean())
    assert replay_error(Schedule(3, (0, 2), (1,)), latents, velocities, sigmas) == pytest.approx(2 * offset, rel=1e-5)
    with pytest.raises(ValueError, match="cannot replay"):
        replay_error(Schedule(4, (0, 3), (1,)), latents, velocities, sigmas)


def _replayed(schedule, runs):
    """Every selectable estimator's replay error of ``schedule`` on ``runs`` (on the same sigmas, the same size:
    pooled, the mean of their errors), step by step."""
    return {e.name: np.mean([replay_estimator_error(e, schedule, *run) for run in runs]) for e in SELECTABLE}


def _two_runs(n):
    """Two recorded toy runs of ``n`` steps on evenly spaced sigmas (seeds 0 and 1)."""
    sigmas = torch.linspace(1.0, 0.0, n + 1).tolist()
    return [(*_trajectory(torch.randn(3, 4, generator=torch.Generator().manual_seed(s)), sigmas), sigmas)
            for s in range(2)]  # fmt: skip


def test_select_by_replay_keeps_the_pair_of_candidate_and_estimator_with_the_least_replay_error(monkeypatch):
    runs = _two_runs(N)
    candidates = [
        Schedule.uniform(N, 5, span=1),
        Schedule.uniform(N, 5, span=3),
        Schedule(N, (0, 1, 2, 7, 13), (1, 1, 2, 2), {"source": "test"}),
    ]
    table = [_replayed(c, runs) for c in candidates]
    monkeypatch.setattr(replay, "REFINE_ROUNDS", 0)  # the pair alone
    chosen = select_by_replay(candidates, runs)
    index, name = min(((i, e) for i in range(3) for e in table[i]), key=lambda pair: table[pair[0]][pair[1]])
    assert (chosen.compute_steps, chosen.spans) == (candidates[index].compute_steps, candidates[index].spans)
    assert chosen.metadata["estimator"] == name and chosen.metadata["replay_candidates"] == 3
    assert chosen.metadata["replay_error"] == pytest.approx(table[index][name], rel=1e-5)
    assert chosen.metadata["estimator_replay_errors"] == pytest.approx(table[index], rel=1e-5)
    assert len({round(e, 9) for errors in table for e in errors.values()}) > 12  # not a tie
    alone = select_by_replay(candidates[2:], runs)  # one candidate: only its estimator is chosen
    assert alone.metadata["source"] == "test" and alone.metadata["estimator"] == min(table[2], key=table[2].get)
    with pytest.raises(ValueError, match="candidates is empty"):
        select_by_replay([], runs)
    with pytest.raises(ValueError, match="runs is empty"):
        select_by_replay(candidates, [])


def test_runs_pooled_beyond_the_cap_are_thinned_evenly(monkeypatch):
    """Runs on the same sigmas are replayed as one; past ``POOLED_ELEMENTS`` together each keeps every k-th element,
    so the error is that of the thinned runs (equal sizes: the mean of theirs)."""
    runs = _two_runs(N)
    sigmas = runs[0][2]
    schedule = Schedule(N, (0, 1, 2, 7, 13), (1, 1, 2, 2))
    monkeypatch.setattr(replay, "POOLED_ELEMENTS", 12)  # two runs of 12 elements: every second element of each
    thinned = [([t.reshape(-1)[::2] for t in latents], [t.reshape(-1)[::2] for t in velocities], sigmas)
               for latents, velocities, _ in runs]  # fmt: skip
    errors = select_estimator_by_replay(schedule, runs).metadata["estimator_replay_errors"]
    assert errors == pytest.approx(_replayed(schedule, thinned), rel=1e-5)
    assert errors != pytest.approx(_replayed(schedule, runs), rel=1e-3)


def test_select_by_replay_refines_its_pick_to_a_local_minimum_of_the_replay_error():
    """From the best pair, one interior computed step moves by 1-3 while that lowers the error (order kept,
    intervals of at most 12 steps, spans capped at step 0), under any estimator: the result's neighbours all
    replay worse, and it replays better than the pair it started from."""
    n = 40
    runs = _two_runs(n)
    start = Schedule(n, (0, 1, 2, 9, 17, 25, 33, 39), (1, 1, 3, 3, 3, 3, 3), {"source": "candidate"})
    chosen = select_by_replay([start], runs)
    assert chosen.metadata["replay_moves"] > 0 and chosen.metadata["source"] == "candidate"
    errors = _replayed(chosen, runs)
    name = chosen.metadata["estimator"]
    assert chosen.metadata["replay_error"] == pytest.approx(errors[name], rel=1e-5) == min(errors.values())
    assert chosen.metadata["replay_error"] < min(_replayed(start, runs).values())
    steps = chosen.compute_steps
    for index, shift in itertools.product(range(1, len(steps) - 1), (-3, -2, -1, 1, 2, 3)):
        moved = (*steps[:index], steps[index] + shift, *steps[index + 1 :])
        if moved[index - 1] < moved[index] < moved[index + 1] and max(np.diff(moved)) <= 12:
            spans = tuple(min(k, max(c, 1)) for c, k in zip(moved, chosen.spans, strict=False))
            neighbour = min(_replayed(Schedule(n, moved, spans), runs).values())
            assert neighbour >= chosen.metadata["replay_error"] * (1 - 1e-5), (moved, spans)


def test_select_by_replay_refines_the_best_pair_of_each_of_the_best_candidate_schedules():
    """``REFINE_STARTS`` local searches, one from the best pair of each of the best candidate schedules: the result is
    the best of what each reaches alone (a search from one candidate), with that candidate's metadata."""
    n = 40
    runs = _two_runs(n)
    candidates = [Schedule(n, steps, (1, 1, 3, 3, 3, 3, 3), {"source": f"candidate {i}"}) for i, steps in enumerate((
        (0, 1, 9, 13, 17, 22, 31, 39), (0, 1, 10, 17, 23, 25, 30, 39), (0, 1, 11, 15, 20, 30, 32, 39),
        (0, 1, 12, 20, 27, 31, 33, 39),  # the worst before refining: not a start
    ))]  # fmt: skip
    alone = [select_by_replay([c], runs) for c in candidates]
    unrefined = [min(_replayed(c, runs).values()) for c in candidates]
    best_three = sorted(range(4), key=lambda i: unrefined[i])[: replay.REFINE_STARTS]
    winner = min(best_three, key=lambda i: alone[i].metadata["replay_error"])
    chosen = select_by_replay(candidates, runs)
    assert chosen.metadata["replay_error"] == pytest.approx(alone[winner].metadata["replay_error"], rel=1e-6)
    assert (chosen.compute_steps, chosen.metadata["source"]) == (alone[winner].compute_steps, f"candidate {winner}")
    assert chosen.metadata["replay_error"] < alone[best_three[0]].metadata["replay_error"]  # not the first start's
    assert chosen.metadata["replay_candidates"] == 4


def test_replay_sample_keeps_fixed_positions_and_replaying_them_is_replaying_the_run_restricted_to_them(monkeypatch):
    """Every estimator acts elementwise, so a schedule replayed on the sampled elements of a run has the error of the
    run restricted to those elements, whatever the estimator."""
    monkeypatch.setattr(replay, "REPLAY_ELEMENTS", 7)
    small = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(replay_sample(small), small.reshape(-1))  # at most REPLAY_ELEMENTS: all of them
    sigmas = torch.linspace(1.0, 0.0, N + 1).tolist()
    latents, velocities = _trajectory(torch.randn(4, 5), sigmas)
    sampled = [replay_sample(t) for t in latents], [replay_sample(t) for t in velocities]
    positions = replay._sample_positions(20, torch.device("cpu"))
    assert positions.tolist() == sorted(set(positions.tolist())) and len(positions) == 7
    assert all(torch.equal(s, t.reshape(-1)[positions]) for s, t in zip(sampled[0], latents, strict=True))
    restricted = [t.reshape(-1)[positions] for t in latents], [t.reshape(-1)[positions] for t in velocities]
    schedule = Schedule(N, (0, 1, 2, 7, 13), (1, 1, 2, 2))
    for estimator in SELECTABLE:
        assert replay_estimator_error(estimator, schedule, *sampled, sigmas) == pytest.approx(
            replay_estimator_error(estimator, schedule, *restricted, sigmas), rel=1e-6
        )


@pytest.mark.parametrize("kind", ["flux", "qwen-image", "hunyuan-video"])
def test_select_schedule_picks_the_candidate_closest_to_the_full_run(kind):
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    calls = [{**tiny_inputs(kind, seed=s), "generator": torch.Generator().manual_seed(s)} for s in range(2)]
    good = Schedule(12, tuple(range(12)), (1,) * 11)  # everything computed: exact
    poor = Schedule.uniform(12, 3)
    chosen = select_schedule(pipe, calls, [poor, good], num_inference_steps=12)
    assert (chosen.compute_steps, chosen.metadata["replay_candidates"]) == (good.compute_steps, 2)
    assert chosen.metadata["replay_error"] == 0.0  # the recorded run itself
    errors = chosen.metadata["estimator_replay_errors"]  # all exact on an all-computed schedule: a tie
    assert errors == dict.fromkeys((e.name for e in SELECTABLE), 0.0) and chosen.metadata["estimator"] == "paper"
    assert "step" not in pipe.scheduler.__dict__  # observing ended
    with pytest.raises(ValueError, match=r"candidates for \[20\] steps cannot run with num_inference_steps=12"):
        select_schedule(pipe, calls, [Schedule.uniform(20, 5)], 12)
    with pytest.raises(ValueError, match="calls is empty"):
        select_schedule(pipe, [], [good], 12)


def test_select_estimator_names_the_estimator_whose_runs_land_closest_and_runs_follow_it():
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    calls = [{**tiny_inputs("flux", seed=s), "generator": torch.Generator().manual_seed(s)} for s in range(2)]
    schedule = Schedule(16, (0, 1, 3, 8, 15), (1, 1, 2, 3), {"source": "test"})
    chosen = select_estimator(pipe, calls, schedule, 16)
    errors = chosen.metadata["estimator_replay_errors"]
    assert list(errors) == [e.name for e in SELECTABLE] and len(set(errors.values())) == len(errors)
    runs = []  # the full runs, recorded step by step, replayed under each estimator

    def observe(step, z, v, sigmas):
        if step == 0:
            runs.append(([], [], sigmas.tolist()))
        runs[-1][0].append(z.float())
        runs[-1][1].append(v.float())

    for call in calls:
        call["generator"].manual_seed(call["generator"].initial_seed())
        with observe_steps(pipe, observe):
            pipe(**call, num_inference_steps=16, output_type="latent")
    expected = _replayed(schedule, runs)  # the two calls' runs pooled
    assert errors == pytest.approx(expected, rel=1e-6)
    assert chosen.metadata["estimator"] == min(errors, key=errors.__getitem__) and chosen.metadata["source"] == "test"
    enable_mean_cache(pipe, MeanCacheConfig(chosen))  # the default estimator: the one the schedule names
    pipe(**tiny_inputs("flux"), num_inference_steps=16, output_type="latent")
    assert summary(pipe).estimator == chosen.metadata["estimator"]
    disable_mean_cache(pipe)
    enable_mean_cache(pipe, MeanCacheConfig(chosen, estimator="paper"))  # named in the config: that one
    pipe(**tiny_inputs("flux"), num_inference_steps=16, output_type="latent")
    assert summary(pipe).estimator == "paper"
    disable_mean_cache(pipe)
    unknown = Schedule(16, schedule.compute_steps, schedule.spans, {"estimator": "taylor"})
    enable_mean_cache(pipe, MeanCacheConfig(unknown))
    known = re.escape(str(sorted(ESTIMATORS)))
    with pytest.raises(ValueError, match=rf"unknown estimator 'taylor' named by the schedule's metadata .*{known}"):
        pipe(**tiny_inputs("flux"), num_inference_steps=16, output_type="latent")
    disable_mean_cache(pipe)
    with pytest.raises(ValueError, match=r"a schedule for 16 steps cannot run with num_inference_steps=12"):
        select_estimator(pipe, calls, schedule, 12)


def test_calibrating_a_real_pipeline(tmp_path):
    pipe = tiny_pipeline("qwen-image")
    pipe.set_progress_bar_config(disable=True)
    calls = [{**tiny_inputs("qwen-image", seed=s), "generator": torch.Generator().manual_seed(s)} for s in range(2)]
    cal = calibrate_pipeline(pipe, calls, num_inference_steps=20, max_gap=6, max_span=4)
    assert cal.trajectories == 2 and cal.num_steps == 20 and cal.costs().shape == (20, 20, 4)
    i, j = np.triu_indices(20, k=2)
    measured = (j - i) <= 6
    assert np.isfinite(cal.costs()[i[measured], j[measured]]).all()
    assert np.isinf(cal.costs()[i[~measured], j[~measured]]).all()
    assert (cal.costs()[np.isfinite(cal.costs())] > 0).all()
    assert cal.metadata["pipeline"] == "QwenImagePipeline" and cal.metadata["generations"] == 2
    assert cal.metadata["generation_settings"] == {"true_cfg_scale": 4.0, "height": 32, "width": 32}
    assert "step" not in pipe.scheduler.__dict__  # the observer is gone
    cal.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json").schedule(8).budget == 8


@pytest.mark.parametrize("name", ["flux-img2img-0.6", "wan-v2v"])
def test_calibrating_a_pipeline_that_starts_later(name: str):
    """At strength 0.6 of 10 steps the scheduler starts at step 4 (told by set_begin_index, or for Wan
    video-to-video only by the timestep): calibration covers the 6 steps that run, and its schedule drives them."""
    pipe, inputs = next(case for case in CASES if case.name == name).build()
    pipe.set_progress_bar_config(disable=True)
    calls = [{**inputs, "generator": torch.Generator().manual_seed(s)} for s in range(2)]
    cal = calibrate_pipeline(pipe, calls, num_inference_steps=10, max_gap=4, max_span=2)
    assert cal.trajectories == 2 and cal.num_steps == 6
    enable_mean_cache(pipe, MeanCacheConfig(cal.schedule(3)))
    pipe(**calls[0], num_inference_steps=10, output_type="latent")
    report = summary(pipe)
    disable_mean_cache(pipe)
    assert report.num_steps == 6 and report.computed_steps == 3


def test_bad_calibration_inputs_get_clear_errors(tmp_path):
    sigmas = torch.linspace(1.0, 0.0, 11).tolist()
    with pytest.raises(ValueError, match=r"max_gap \(an edge must skip a step\) must be an integer >= 2, got 1"):
        StabilityCostAccumulator(sigmas, max_gap=1)
    with pytest.raises(ValueError, match="unknown aggregate 'median'"):
        StabilityCostAccumulator(sigmas, aggregate="median")
    with pytest.raises(ValueError, match="strictly decreasing"):
        StabilityCostAccumulator([1.0, 1.0, 0.0])
    acc = StabilityCostAccumulator(sigmas)
    with pytest.raises(RuntimeError, match="expected step 0, got 3"):
        acc.add_step(3, torch.zeros(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="no complete trajectory"):
        acc.result()
    with pytest.raises(ValueError, match="unknown cost kind 'l2'"):
        calibrate(toy_velocity, [torch.zeros(2)], sigmas).costs("l2")
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a calibration file"):
        Calibration.load(tmp_path / "x.json")
    pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="calls is empty"):
        calibrate_pipeline(pipe, [], 10)
    enable_mean_cache(pipe, MeanCacheConfig(Schedule.uniform(10, 5)))
    with pytest.raises(RuntimeError, match="already wrapped"):
        calibrate_pipeline(pipe, [tiny_inputs("flux")], 10)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"sigmas": [1.0, 0.0]}, ValueError, r"max_span must be an integer in \[1, 1\], got 2"),  # too few sigmas
        ({"sigmas": [1.0]}, ValueError, r"sigmas needs 2 to 10001 values \(N \+ 1 for N steps\), got 1"),
        ({"max_span": 1}, ValueError, r"one_shot must be an array of shape \(N, N, max_span\) = \(10, 10, 1\)"),
        ({"max_gap": "8"}, TypeError, r"max_gap must be an integer >= 2, got '8' \(str\)"),
        ({"closed_loop": [[["0.5"]]]}, TypeError, r"closed_loop costs must be numbers or null, got '0.5' \(str\)"),
        ({"one_shot": [[1.0], [1.0, 2.0]]}, ValueError, r"one_shot must be a regular \(N, N, max_span\) nesting"),
        ({"one_shot": -1}, TypeError, r"one_shot must be nested lists of costs, got int"),
        ({"metadata": "x"}, TypeError, r"metadata must be a dict \(a JSON object\), got 'x'"),
        ({"aggregate": "median"}, ValueError, r"unknown aggregate 'median'"),
        ({"trajectories": 0}, ValueError, r"trajectories must be an integer >= 1, got 0"),
        ({"sigmas": [1.0, float("nan"), *np.linspace(0.8, 0, 9)]}, ValueError, r"sigmas\[1\] must be finite, got nan"),
    ],
)
def test_load_refuses_bad_calibration_files_naming_them(tmp_path, changes, error, message):
    """Items 5 and 6 of issue #15 (a NaN sigma used to give a schedule silently)."""
    path = tmp_path / "c.json"
    calibrate(toy_velocity, [torch.zeros(2)], np.linspace(1.0, 0.0, 11), max_gap=3, max_span=2).save(path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))
    with pytest.raises(error, match=re.escape(f"{str(path)!r} is not a valid calibration: ") + message):
        Calibration.load(path)


def test_nan_sigmas_are_refused_when_calibrating():
    with pytest.raises(ValueError, match=r"sigmas\[2\] must be finite, got nan"):
        StabilityCostAccumulator([1.0, 0.5, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"strictly decreasing .* sigmas\[2\] = 0.5 follows 0.5"):
        calibrate(toy_velocity, [torch.zeros(2)], [1.0, 0.5, 0.5, 0.0])


# --- the step-by-step implementation the batched one replaced, kept as its reference --------------------------


class StepByStepCosts:
    """Both cost kinds one edge at a time, with the runtime estimator and a host read per cost (what
    ``StabilityCostAccumulator`` did before it batched them): the reference of the exactness tests and of
    ``benchmarks/bench_calibration.py``."""

    def __init__(self, sigmas, max_gap=8, max_span=5, aggregate="mean"):
        self.sigmas, self.max_gap, self.max_span, self.aggregate = list(sigmas), max_gap, max_span, aggregate
        n = self.num_steps = len(sigmas) - 1
        self.totals = {kind: np.zeros((n, n, max_span)) for kind in COST_KINDS}
        self.current = {kind: np.zeros((n, n, max_span)) for kind in COST_KINDS}
        self.measured = np.zeros((n, n), dtype=bool)
        self.window = collections.deque(maxlen=max_span + max_gap + 1)
        self.trajectories = 0

    def add_step(self, step, z, v):
        self.window.append((step, z.detach().to(HISTORY_DTYPE, copy=True), v.detach().to(HISTORY_DTYPE, copy=True)))
        if step >= self.max_gap:
            self.edges_from(step - self.max_gap, step)
        if step == self.num_steps - 1:
            for start in range(max(0, step - self.max_gap + 1), step - 1):
                self.edges_from(start, step)
            for kind in COST_KINDS:
                if self.aggregate == "mean":
                    self.totals[kind] += self.current[kind]
                else:
                    np.maximum(self.totals[kind], self.current[kind], out=self.totals[kind])
                self.current[kind].fill(0.0)
            self.trajectories += 1
            self.window.clear()

    def costs(self, kind):
        total = self.totals[kind] / (self.trajectories if self.aggregate == "mean" else 1)
        return np.where(self.measured[..., None], total, np.inf)

    def get(self, step):
        _, z, v = self.window[step - self.window[0][0]]
        return z, v

    def edges_from(self, start, end):
        if end < start + 2:
            return
        s = self.sigmas
        z_i, v_i = self.get(start)
        for span in range(1, self.max_span + 1):
            k = min(span, start)
            for j in range(start + 2, end + 1):
                if k == 0:
                    predicted = z_i + (s[j] - s[start]) * v_i
                else:
                    z_r, v_r = self.get(start - k)
                    predicted, _ = average_velocity_step(z_i, v_i, z_r, v_r, s[start - k], s[start], s[j])
                error = (predicted - self.get(j)[0]).abs().mean().item() / abs(s[j] - s[start])
                self.current["one-shot"][start, j, span - 1] = error
            self.closed_loop(start, end, span, k)
        self.measured[start, start + 2 : end + 1] = True

    def closed_loop(self, start, end, span, k):
        s, first = self.sigmas, start - k
        steps = end - first + 1
        estimator = PaperRuleEstimator(Schedule(steps, (*range(k + 1), end - first), (1,) * k + (min(span, steps),)))
        for step in range(first, start + 1):
            z, v = self.get(step)
            estimator.record(step - first, z, s[step], v)
        z_i, v_i = self.get(start)
        z_hat = z_i + (s[start + 1] - s[start]) * v_i
        for m in range(start + 1, end + 1):
            if m >= start + 2:
                error = (z_hat - self.get(m)[0]).abs().mean().item() / abs(s[m] - s[start])
                self.current["closed-loop"][start, m, span - 1] = error
            if m < end:
                z_hat, _ = estimator.estimate(m - first, z_hat, s[m], s[m + 1])


def step_by_step_replay_error(schedule, latents, velocities, sigmas, estimator_class=PaperRuleEstimator):
    """``replay_error`` one candidate at a time with the runtime estimator (the reference of the batched one)."""
    n = len(sigmas) - 1
    estimator = estimator_class(schedule)
    z = latents[0].to(HISTORY_DTYPE)
    error = torch.zeros((), dtype=torch.float64)
    for step in range(n):
        v = velocities[step].to(HISTORY_DTYPE)
        if schedule.is_computed(step):
            estimator.record(step, z, sigmas[step], v)
            z = z + (sigmas[step + 1] - sigmas[step]) * v
        else:
            z, _ = estimator.estimate(step, z, sigmas[step], sigmas[step + 1])
        if step + 1 < n:
            reference = latents[step + 1].to(HISTORY_DTYPE)
        else:
            reference = latents[n - 1].to(HISTORY_DTYPE) + (sigmas[n] - sigmas[n - 1]) * v
        error += (z - reference).abs().mean()
    return float(error)


def shifted_sigmas(n, shift=3.0):
    """A shifted flow-matching schedule (as FLUX's): ``shift t / (1 + (shift - 1) t)`` on ``t = 1 .. 1/n``, then 0."""
    t = np.linspace(1.0, 1.0 / n, n)
    return [*(shift * t / (1 + (shift - 1) * t)).tolist(), 0.0]


def random_trajectory(shape, sigmas, seed):
    """A full-compute Euler run of a random smooth field: latents ``z_i`` (before step ``i``) and velocities."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=generator)
    weights = torch.randn(shape, generator=generator)
    latents, velocities = [], []
    for i in range(len(sigmas) - 1):
        v = torch.sin(weights * z + 2.0 * sigmas[i]) - z + 0.1 * torch.randn(shape, generator=generator)
        latents.append(z)
        velocities.append(v)
        z = z + (sigmas[i + 1] - sigmas[i]) * v
    return latents, velocities


EXACTNESS_CASES = [
    ((1, 3, 5, 7), 13, 8, 5),
    ((2, 16, 4), 50, 8, 5),
    ((1, 3, 5, 7), 50, 3, 1),
    ((2, 16, 4), 13, 3, 1),
    ((4, 9), 6, 8, 5),  # every start is a tail start: the run is shorter than a gap
]


@pytest.mark.parametrize(("shape", "n", "max_gap", "max_span"), EXACTNESS_CASES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_batched_costs_reproduce_the_step_by_step_ones(shape, n, max_gap, max_span, aggregate):
    """Equal up to float32 rounding: rtol 1e-5, or a few float32 ulps of the latents over the edge's interval
    (a cost is ``mean|z_hat_j - z_j| / |sigma_j - sigma_i|``, each ``z_hat_j`` rounded to float32). That bound is
    the step-by-step reference's own rounding: on these cases it is up to 1.7e-5 (relative) off a float64
    evaluation, the batched costs up to 1.3e-6 (the coefficients are exact and no latent is rounded twice)."""
    sigmas = shifted_sigmas(n)
    batched = StabilityCostAccumulator(sigmas, max_gap, max_span, aggregate)
    reference = StepByStepCosts(sigmas, max_gap, max_span, aggregate)
    magnitude = 0.0
    for seed in range(3):  # trajectories accumulate alike
        for step, (z, v) in enumerate(zip(*random_trajectory(shape, sigmas, seed), strict=True)):
            batched.add_step(step, z, v)
            reference.add_step(step, z, v)
            magnitude = max(magnitude, z.abs().mean().item())
    calibration = batched.result()
    assert calibration.trajectories == 3 and calibration.aggregate == aggregate
    intervals = np.abs(np.subtract.outer(sigmas[:n], sigmas[:n]))  # |sigma_j - sigma_i| at [i, j]
    ulps = 4 * np.finfo(np.float32).eps * magnitude / np.where(intervals > 0, intervals, 1.0)
    for kind in COST_KINDS:
        got, expected = calibration.costs(kind), reference.costs(kind)
        finite = np.isfinite(expected)
        assert np.array_equal(np.isfinite(got), finite) and finite.any()
        difference = np.abs(got[finite] - expected[finite])
        assert np.all(difference <= 1e-5 * expected[finite] + np.broadcast_to(ulps[..., None], got.shape)[finite])


@pytest.mark.parametrize("estimator", SELECTABLE, ids=lambda e: e.name)
@pytest.mark.parametrize(("shape", "n"), [((1, 3, 5, 7), 13), ((2, 16, 4), 50)])
def test_batched_replay_under_each_estimator_is_its_step_by_step_replay(estimator, shape, n, monkeypatch):
    """``replay_errors`` plans each estimator's nodes and weights from the schedules and replays them together; it
    must equal driving the estimator itself step by step, also in groups of one schedule at a time."""
    sigmas = shifted_sigmas(n)
    latents, velocities = random_trajectory(shape, sigmas, 0)
    calibration = calibrate(toy_velocity, [torch.randn(shape)], sigmas, max_gap=8, max_span=5)
    candidates = [*calibration.candidate_schedules(max(n // 5, 3)), *calibration.candidate_schedules(n // 2)]
    candidates += [Schedule.uniform(n, 4, span=3), Schedule(n, tuple(range(n)), (1,) * (n - 1))]
    expected = [replay_estimator_error(estimator, c, latents, velocities, sigmas) for c in candidates]
    np.testing.assert_allclose(replay_errors(candidates, latents, velocities, sigmas, estimator), expected,
                               rtol=2e-5, atol=1e-7)  # fmt: skip
    monkeypatch.setattr(replay, "WORKING_SET", 1)
    np.testing.assert_allclose(replay_errors(candidates, latents, velocities, sigmas, estimator), expected,
                               rtol=2e-5, atol=1e-7)  # fmt: skip
    with pytest.raises(ValueError, match="'exact-jvp' estimator cannot be replayed in a batch"):
        replay_errors(candidates, latents, velocities, sigmas, ExactJVPEstimator)


@pytest.mark.parametrize(("shape", "n"), [((1, 3, 5, 7), 13), ((2, 16, 4), 50)])
def test_batched_replay_reproduces_the_step_by_step_one(shape, n):
    sigmas = shifted_sigmas(n)
    latents, velocities = random_trajectory(shape, sigmas, 0)
    calibration = calibrate(toy_velocity, [torch.randn(shape)], sigmas, max_gap=8, max_span=5)
    candidates = calibration.candidate_schedules(max(n // 5, 3))
    candidates += [Schedule.uniform(n, 4, span=3), Schedule(n, tuple(range(n)), (1,) * (n - 1))]
    expected = [step_by_step_replay_error(c, latents, velocities, sigmas) for c in candidates]
    got = [replay_error(c, latents, velocities, sigmas) for c in candidates]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    chosen = select_by_replay(candidates, [(latents, velocities, sigmas)])  # its paper-rule errors are the batched ones
    index = next(i for i, c in enumerate(candidates) if (c.compute_steps, c.spans) == (chosen.compute_steps,
                                                                                      chosen.spans))  # fmt: skip
    assert chosen.metadata["estimator_replay_errors"]["paper"] == pytest.approx(expected[index], rel=1e-5)


def replay_cases(n):
    """A run of ``n`` steps and schedules to replay on it: PSSP candidates, uniform, the ends only, and full."""
    sigmas = shifted_sigmas(n)
    latents, velocities = random_trajectory((2, 16, 4), sigmas, 2)
    calibration = calibrate(toy_velocity, [torch.randn(2, 16, 4)], sigmas, max_gap=8, max_span=5)
    candidates = [*calibration.candidate_schedules(max(n // 5, 3)), Schedule.uniform(n, 4, span=3)]
    candidates += [Schedule(n, (0, n - 1), (5,)), Schedule(n, tuple(range(n)), (1,) * (n - 1))]
    return candidates, latents, velocities, sigmas


@pytest.mark.parametrize("n", [13, 50])
def test_estimator_replay_of_the_paper_rule_is_the_batched_replay(n):
    candidates, latents, velocities, sigmas = replay_cases(n)
    batched = [replay_error(c, latents, velocities, sigmas) for c in candidates]
    driven = [replay_estimator_error(PaperRuleEstimator, c, latents, velocities, sigmas) for c in candidates]
    np.testing.assert_allclose(driven, batched, rtol=1e-5, atol=1e-7)
    assert driven[-1] == 0.0  # a full schedule replays the run itself


VARIANTS = {
    "data-linear": DataLinearEstimator,
    "velocity, undamped, last two": type("V", (TrajectoryExtrapolationEstimator,), {"target": "velocity"}),
    "data, damping 0.75, wide base": type("D", (TrajectoryExtrapolationEstimator,), {"damping": 0.75, "min_base": 1.0}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_estimator_replay_drives_an_extrapolation_variant_as_a_hand_loop(variant):
    candidates, latents, velocities, sigmas = replay_cases(50)
    estimator_class = VARIANTS[variant]
    driven = [replay_estimator_error(estimator_class, c, latents, velocities, sigmas) for c in candidates]
    by_hand = [step_by_step_replay_error(c, latents, velocities, sigmas, estimator_class) for c in candidates]
    np.testing.assert_allclose(driven, by_hand, rtol=1e-6)
    paper = [replay_error(c, latents, velocities, sigmas) for c in candidates]
    assert driven[-1] == 0.0 and driven[:-1] != pytest.approx(paper[:-1], rel=1e-3)  # another rule, other errors


def test_estimator_replay_refuses_derivatives_and_mismatched_runs():
    candidates, latents, velocities, sigmas = replay_cases(13)
    with pytest.raises(ValueError, match="dv/dsigma"):
        replay_estimator_error(ExactJVPEstimator, candidates[0], latents, velocities, sigmas)
    with pytest.raises(ValueError, match="cannot replay"):
        replay_estimator_error(DataLinearEstimator, candidates[0], latents[:-1], velocities[:-1], sigmas[:-1])


def test_chunked_costs_and_replay_match_the_whole_latent_at_once(monkeypatch):
    """Latents larger than ``WORKING_SET`` are done by chunks of columns (costs) and groups of candidates
    (replay); the chunks only reorder float32 sums."""
    sigmas = shifted_sigmas(13)
    latents, velocities = random_trajectory((2, 16, 4), sigmas, 1)

    def run():
        accumulator = StabilityCostAccumulator(sigmas, 8, 5)
        for step, (z, v) in enumerate(zip(latents, velocities, strict=True)):
            accumulator.add_step(step, z, v)
        calibration = accumulator.result()
        candidates = calibration.candidate_schedules(4)
        return calibration, candidates, [replay_error(c, latents, velocities, sigmas) for c in candidates]

    whole, candidates, errors = run()
    monkeypatch.setattr(costs, "WORKING_SET", 100)  # 1 column of 70 rows at a time
    monkeypatch.setattr(replay, "WORKING_SET", 100)  # 1 candidate of 128 elements at a time
    chunked, chunked_candidates, chunked_errors = run()
    for kind in COST_KINDS:
        np.testing.assert_allclose(chunked.costs(kind), whole.costs(kind), rtol=1e-6)
    assert [(c.compute_steps, c.spans) for c in chunked_candidates] == [(c.compute_steps, c.spans) for c in candidates]
    np.testing.assert_allclose(chunked_errors, errors, rtol=1e-6)
    chosen = select_by_replay(candidates, [(latents, velocities, sigmas)])
    index = [(c.compute_steps, c.spans) for c in candidates].index((chosen.compute_steps, chosen.spans))
    assert chosen.metadata["estimator_replay_errors"]["paper"] == errors[index]
