"""Claims about experiments/popgym_study.py: the real script's --quick study (a population per configuration, the
whole-episode unroll), its resumption, the table's cells, its bad input."""

import json

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
