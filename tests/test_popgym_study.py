"""Claims about experiments/popgym_study.py: the real script's --quick study (a population per configuration, the
whole-episode unroll), its resumption, the table's cells, its bad input."""

import json
import os

import helpers
import pytest

import experiments.popgym_study as study

# its --quick (the `quick` fixture): RepeatPreviousEasy x rtrl:4, lstm:episode x seeds 1-2
RUNNER = study.__file__


def test_quick_study_runs_every_config_and_reports_mmer_per_seed(quick):
    out, _, proc = quick
    assert proc.returncode == 0, proc.stderr + proc.stdout
    records = [json.loads(line) for line in (out / "report" / "runs.jsonl").read_text().splitlines()]
    keys = [f"popgym-RepeatPreviousEasy-v0__{c}__s1-2__s{seed}" for c in ("rtrl_4", "lstm_episode") for seed in (1, 2)]
    assert sorted(r["key"] for r in records) == sorted(k.replace("__s1-2__", "__") for k in keys)
    assert all(r["status"] == "ok" for r in records)
    episode = next(r for r in records if r["config"]["num_steps"] == "episode")
    assert "--num-steps 52" in episode["command"]  # RepeatPreviousEasy: 51 steps and the terminal one
    results = json.loads((out / "report" / "results.json").read_text())
    for cell in results["cells"]:
        mine = [r for r in records if study.memory_study.label(r["config"]) == cell["config"]]
        assert cell["mmer"]["values"] == [r["metrics"]["mmer"] for r in sorted(mine, key=lambda r: r["config"]["seed"])]
    table = (out / "report" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| RepeatPreviousEasy |"))
    assert row.count("±") == 2 and row.endswith("| unverified | unverified | unverified |")
    assert (out / "report" / "popgym.png").stat().st_size > 0


def test_a_finished_study_launches_nothing_when_started_again(quick):
    out, flags, _ = quick
    proc = helpers.run_script(RUNNER, out, *flags)
    assert proc.returncode == 0 and "2 runs in the grid: 2 finished earlier (skipped), 0 to run" in proc.stdout


def test_the_critics_course_per_run_is_read_from_its_log(quick):
    """experiments/popgym_critic.py on the quick study: a row per run, |V| by part of training as the run logged it
    (the largest of the three is the study's value_max), the lowest entropy of the first half over the first."""
    out, _, _ = quick
    critic = os.path.join(os.path.dirname(RUNNER), "popgym_critic.py")
    proc = helpers.run_script(critic, out, str(out / "report" / "runs.jsonl"))
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(cells[1:3]): cells[3:] for cells in (line.split(" | ") for line in proc.stdout.splitlines()[2:])}
    records = [json.loads(line) for line in (out / "report" / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == len(records) == 4
    for r in records:
        c = r["config"]
        first, middle, last, entropy, mmer = rows[(f"{c['core']}:{c['num_steps']}", str(c["seed"]))]
        entropies = [v for _, v in helpers.scalar_steps(r["run_dir"])["losses/entropy"]]
        assert float(entropy) == pytest.approx(min(entropies[: max(len(entropies) // 2, 1)]) / entropies[0], abs=5e-4)
        assert max(map(float, (first, middle, last))) == pytest.approx(r["metrics"]["value_max"], abs=0.05)
        assert mmer.rstrip(" |") == f"{r['metrics']['mmer']:.2f}"
    missing = helpers.run_script(critic, out, "missing.jsonl")
    assert missing.returncode == 2 and missing.stderr == "popgym_critic.py: error: missing.jsonl: no such file\n"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tasks", "RepeatFrist"], "--tasks in RepeatFirst, "),
        (["--configs", "rtrl:often"], "--configs wants CORE:UNROLL"),
        (["--extra", "--num-steps 8"], "--num-steps is set by the runner"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(study.parse_args, flags, message, capsys)
