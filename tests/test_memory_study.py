"""Claims about experiments/memory_study.py: the real script's --quick study, its resumption, the bsuite score per
configuration and seed, its bad input."""

import json

import helpers
import pytest

import experiments.memory_study as study

# its --quick (the `quick` fixture): 2 lengths x rtrl:4, tbptt:4 x seed 1, the real training script
RUNNER = study.__file__


def test_quick_study_runs_every_config_and_reports_bsuites_verdicts(quick):
    out, _, proc = quick
    assert proc.returncode == 0, proc.stderr + proc.stdout
    records = [json.loads(line) for line in (out / "report" / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(f"memory_len_{i}__{c}_4__s1" for i in (0, 3) for c in ("rtrl", "tbptt"))
    assert all(r["status"] == "ok" and r["metrics"]["episodes"] >= 48 for r in records)
    results = json.loads((out / "report" / "results.json").read_text())
    assert [row["config"] for row in results["rows"]] == ["rtrl:4", "tbptt:4"]
    for row in results["rows"]:
        mine = [r for r in records if r["config"]["core"] == row["config"].split(":")[0]]
        assert row["scores"] == {"1": sum(r["metrics"]["learned"] for r in mine) / 2}
        assert sorted(row["lengths"]) == ["1", "4"]  # memory_len/0 and /3
        right = {str(study.LENGTHS["memory_len"][r["config"]["setting"]]): 1 - r["metrics"]["wrong_fraction"] for r in mine}
        assert {k: v["right"]["values"] for k, v in row["lengths"].items()} == {k: [v] for k, v in right.items()}
    table = (out / "report" / "table.md").read_text()
    assert "| configuration | score | 1 | 4 |" in table and "actor_critic_rnn: 0.65" in table
    assert sum(line.startswith(("| `rtrl:4` | **", "| `tbptt:4` | **")) for line in table.splitlines()) == 2
    assert (out / "report" / "memory_memory_len.png").stat().st_size > 0


def test_a_finished_study_launches_nothing_when_started_again(quick):
    out, flags, _ = quick
    proc = helpers.run_script(RUNNER, out, *flags)
    assert proc.returncode == 0 and "4 runs in the grid: 4 finished earlier (skipped), 0 to run" in proc.stdout


def record(config, setting, seed, learned):
    config = dict(env_id=f"memory_len/{setting}", setting=setting, core=config, num_steps=4, seed=seed, sets={})
    metrics = dict(wrong_fraction=0.1 if learned else 0.5, learned=learned)
    return dict(key=study.run_key(config), status="ok", config=config, metrics=metrics)


def test_a_seeds_score_is_the_fraction_of_settings_learned_and_needs_every_setting():
    """Seed 1 learns 2 of 3 settings; seed 2 learns all 3; seed 3 misses a setting: no score for it."""
    learned = {1: (True, True, False), 2: (True, True, True), 3: (True, True)}
    records = [record("rtrl", i, seed, flag) for seed, flags in learned.items() for i, flag in enumerate(flags)]
    settings, (row,) = study.aggregate(records, "memory_len")
    assert settings == [0, 1, 2] and row["config"] == "rtrl:4"
    assert row["scores"] == {1: pytest.approx(2 / 3), 2: 1.0} and row["score"]["n"] == 2
    low, high = row["score_ci"]  # resampling two seeds: every mean lies between them, both ends are reached
    assert low == pytest.approx(2 / 3) and high == pytest.approx(1.0)
    assert row["lengths"][3]["learned"] == 1 and row["lengths"][3]["seeds"] == [1, 2]
    assert row["lengths"][1]["right"]["values"] == pytest.approx([0.9, 0.9, 0.9])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--configs", "rtrl"], "--configs wants CORE:UNROLL[:FLAG=VALUE...]"),
        (["--configs", "rtrll:4"], "--configs wants CORE:UNROLL"),
        (["--configs", "rtrl:4:stem"], "--configs wants CORE:UNROLL"),
        (["--settings", "23"], "--settings in 0-22"),
        (["--experiment", "memory_size", "--settings", "17"], "--settings in 0-16"),
        (["--experiment", "catch"], "--experiment must be one of memory_len, memory_size"),
        (["--extra", "--seed 3"], "--seed is set by the runner"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(study.parse_args, flags, message, capsys)


def test_one_process_trains_each_run_of_consecutive_seeds_and_records_each_seed_as_a_run():
    assert study.populations((7, 1, 2, 3, 9, 8, 12)) == [[1, 2, 3], [7, 8, 9], [12]]
    job = dict(env_id="memory_len/4", setting=4, core="rtrl", num_steps=4, seeds=[2, 3], sets={})
    assert study.run_key(job) == "memory_len_4__rtrl_4__s2-3"
    members = study.members(job)
    assert [(key, suffix) for key, _, suffix in members] == [
        ("memory_len_4__rtrl_4__s2", "__s2"),
        ("memory_len_4__rtrl_4__s3", "__s3"),
    ]
    assert [config["seed"] for _, config, _ in members] == [2, 3] and "seeds" not in members[0][1]
    assert study.script_flags(job, {"extra": []})[-4:] == ["--seed", "2", "--num-seeds", "2"]
    assert [suffix for _, _, suffix in study.members({**job, "seeds": [5]})] == [""]  # K = 1: --run-name as given


def test_a_population_stopped_before_all_its_seeds_finished_runs_again_whole(tmp_path):
    """Seeds 1 2: four processes of two agents. With one seed's record gone (as if stopped before it was written),
    a restart runs that process again, both seeds, in fresh directories; the other three are skipped."""
    flags = ("--quick", "--seeds", "1", "2", "--out-dir", str(tmp_path / "report"), "--work-dir", str(tmp_path / "work"))
    assert helpers.run_script(RUNNER, tmp_path, *flags).returncode == 0
    runs = tmp_path / "report" / "runs.jsonl"
    records = [json.loads(line) for line in runs.read_text().splitlines()]
    assert len(records) == 8 and {r["run_name"] for r in records} >= {
        "memory_len_3__rtrl_4__s1-2__s1",
        "memory_len_3__rtrl_4__s1-2__s2",
    }
    runs.write_text("".join(json.dumps(r) + "\n" for r in records if r["key"] != "memory_len_3__rtrl_4__s2"))
    proc = helpers.run_script(RUNNER, tmp_path, *flags)
    assert proc.returncode == 0 and "4 runs in the grid: 3 finished earlier (skipped), 1 to run" in proc.stdout
    again = [json.loads(line) for line in runs.read_text().splitlines()][7:]
    assert sorted(r["run_name"] for r in again) == ["memory_len_3__rtrl_4__s1-2__a2__s1", "memory_len_3__rtrl_4__s1-2__a2__s2"]
    assert all(r["status"] == "ok" for r in again)


def test_the_scores_bootstrap_interval_holds_the_mean_and_narrows_with_more_seeds():
    assert study.bootstrap_ci([0.5]) is None and study.bootstrap_ci([0.8] * 5) == [0.8, 0.8]
    few, many = study.bootstrap_ci([0.7, 0.9, 0.8]), study.bootstrap_ci([0.7, 0.9, 0.8] * 10)
    assert few[0] < 0.8 < few[1] and many[0] < 0.8 < many[1] and many[1] - many[0] < few[1] - few[0]
