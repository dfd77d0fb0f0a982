"""Claims about experiments/unroll_study.py: the real script's --quick study, resuming, retries, the aggregation."""

import csv
import json
import math
import os
import statistics

import helpers
import numpy as np
import pytest

import experiments.unroll_study as study

RUNNER = study.__file__
REAL_SCRIPT = study.Args.script  # rtrl_a2c_minigrid.py at the repo root

# A stand-in for the training script: the same flags, the same tags, episodes whose numbers the tests know.
# Episode k ends at global step 100 k with return step / total and success k % 2. FAKE_FAIL_CORE=core makes that core
# crash after it created its run directory; every run appends "start end OMP_NUM_THREADS" to FAKE_LOG.
FAKE = """
import argparse, atexit, os, sys, time
start = time.time()
omp = os.environ.get("OMP_NUM_THREADS")
atexit.register(lambda: open(os.environ["FAKE_LOG"], "a").write(f"{start} {time.time()} {omp}\\n"))
p = argparse.ArgumentParser()
for flag in ("--env-id", "--core", "--run-name"):
    p.add_argument(flag)
for flag in ("--num-steps", "--seed", "--total-timesteps"):
    p.add_argument(flag, type=int)
args, _ = p.parse_known_args()
if os.path.exists(f"runs/{args.run_name}"):
    sys.exit(f"runs/{args.run_name} exists")
from tensorboard.compat.proto.event_pb2 import Event  # what torch's SummaryWriter writes, without importing torch
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
writer = EventFileWriter(f"runs/{args.run_name}")
def add_scalar(tag, value, step):
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
    writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
if args.core == os.environ.get("FAKE_FAIL_CORE"):
    writer.close()
    sys.exit("RuntimeError: the fake crashed")
for step in range(100, args.total_timesteps + 1, 100):
    add_scalar("charts/episodic_return", step / args.total_timesteps, step)
    add_scalar("charts/episodic_length", 100, step)
    add_scalar("charts/success", float(step // 100 % 2), step)
    add_scalar("charts/SPS", 1000.0, step)
add_scalar("eval/episodic_return", 0.5, 0)
add_scalar("eval/success", 1.0, 0)
writer.close()
"""


def run_study(cwd, *flags, env=None):
    return helpers.run_script(RUNNER, cwd, *flags, env=env)


def read(out):
    results = json.loads((out / "results.json").read_text())
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return results, rows, (out / "table.md").read_text()


def assert_finite(*values):
    assert all(v is not None and math.isfinite(v) for v in values), values


# ---------------------------------------------------------------------------------------------
# The real script: --quick (the CI smoke run), then its restart
# ---------------------------------------------------------------------------------------------
QUICK_FLAGS = ("--quick", "--jobs", "2", "--out-dir", "out", "--work-dir", "work")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("quick")
    return tmp_path, run_study(tmp_path, *QUICK_FLAGS)


def test_quick_run_of_the_real_script_writes_one_record_per_config_and_the_report(quick_study):
    tmp_path, proc = quick_study
    assert os.path.exists(REAL_SCRIPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    results, rows, table = read(out)
    expected = {(core, n) for core in study.QUICK["cores"] for n in study.QUICK["num_steps"]}
    assert sorted((r["config"]["core"], r["config"]["num_steps"]) for r in results["runs"]) == sorted(expected)
    for r in results["runs"]:
        m = r["metrics"]
        assert r["status"] == "ok" and m["final_episodes"] > 0 and m["eval_episodes"] == 1
        assert_finite(m["final_return"], m["final_success"], m["eval_return"], m["eval_success"], m["sps"])
        assert len(r["curve"]["episodic_return"]) == study.CURVE_BINS and any(r["curve"]["episodic_return"])
        core = r["config"]["core"]
        assert r["command"].startswith(f"python rtrl_a2c_minigrid.py --env-id MiniGrid-MemoryS7-v0 --core {core}")
        assert r["command"].endswith(f"--run-name {r['run_name']}") and os.path.isdir(r["run_dir"])
    assert {(c["core"], c["num_steps"]) for c in results["cells"]} == expected
    assert all(c["n"] == 1 and c["final_return"]["sd"] is None for c in results["cells"])
    assert len(rows) == len(expected) and all(row["status"] == "ok" for row in rows)
    for png in ("curves_MiniGrid-MemoryS7-v0.png", "final_MiniGrid-MemoryS7-v0.png"):
        assert png in table and (out / png).stat().st_size > 1000
    assert "| rtrl | " in table and "--num-steps 8" in table and "--quick --jobs" in table
    assert "`--num-envs 2 --hidden-size 8 --eval-episodes 1`" in table
    assert not list(out.glob("*.tmp"))


def test_restart_of_a_finished_study_launches_nothing(quick_study):
    tmp_path, first = quick_study
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "out" / "runs.jsonl").read_bytes(), sorted(os.listdir(tmp_path / "work" / "runs"))
    proc = run_study(tmp_path, *QUICK_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert "4 runs in the grid: 4 finished earlier (skipped), 0 to run" in proc.stdout
    assert ((tmp_path / "out" / "runs.jsonl").read_bytes(), sorted(os.listdir(tmp_path / "work" / "runs"))) == before


# ---------------------------------------------------------------------------------------------
# The fake script: parallel runs, a crash, a run killed mid-way
# ---------------------------------------------------------------------------------------------
def test_runs_go_jobs_at_a_time_and_failed_or_killed_runs_rerun_in_fresh_directories(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE)
    flags = (
        "--script",
        "fake.py",
        "--cores",
        "rtrl",
        "tbptt",
        "--num-steps",
        "2",
        "--seeds",
        "1",
        "--total-timesteps",
        "1000",
        "--jobs",
        "2",
        "--out-dir",
        "out",
        "--work-dir",
        "work",
    )
    env = {**os.environ, "FAKE_LOG": str(tmp_path / "lifetimes"), "OMP_NUM_THREADS": "4"}
    killed = tmp_path / "work" / "runs" / "MiniGrid-MemoryS7-v0__rtrl__ns2__s1"
    killed.mkdir(parents=True)  # what a run killed mid-way leaves: its directory, and no record

    proc = run_study(tmp_path, *flags, env={**env, "FAKE_FAIL_CORE": "tbptt"})
    assert proc.returncode == 1 and "1 runs failed" in proc.stdout, proc.stdout + proc.stderr
    (start_a, end_a, omp_a), (start_b, end_b, omp_b) = (line.split() for line in open(tmp_path / "lifetimes"))
    assert max(float(start_a), float(start_b)) < min(float(end_a), float(end_b))  # --jobs 2: both at once
    assert omp_a == omp_b == "1"
    results, rows, table = read(tmp_path / "out")
    runs = {r["config"]["core"]: r for r in results["runs"]}
    assert runs["rtrl"]["status"] == "ok" and runs["rtrl"]["run_name"] == killed.name + "__a2"
    assert not os.listdir(killed)
    assert runs["tbptt"]["status"] == "failed" and "the fake crashed" in runs["tbptt"]["log_tail"]
    assert "Failed runs" in table and runs["tbptt"]["run_name"] in table
    # the final window: episodes ending at steps 800, 900, 1000 (>= 80% of 1000), success 0, 1, 0
    m = runs["rtrl"]["metrics"]
    assert m["final_episodes"] == 3 and m["episodes"] == 10 and m["sps"] == 1000
    assert m["final_return"] == pytest.approx(np.mean([0.8, 0.9, 1.0])) and m["final_success"] == pytest.approx(1 / 3)
    assert m["eval_return"] == 0.5 and m["eval_success"] == 1.0
    assert runs["rtrl"]["curve"]["episodic_return"][:5] == [None] * 4 + [pytest.approx(0.1)]  # bins of 25 steps

    proc = run_study(tmp_path, *flags, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 finished earlier (skipped), 1 to run" in proc.stdout
    results, rows, table = read(tmp_path / "out")
    assert [(r["config"]["core"], r["status"], r["run_name"]) for r in results["runs"]][2:] == [
        ("tbptt", "ok", "MiniGrid-MemoryS7-v0__tbptt__ns2__s1__a2")
    ]
    assert sorted(row["status"] for row in rows) == ["failed", "ok", "ok"]
    assert {c["core"]: c["n"] for c in results["cells"]} == {"rtrl": 1, "tbptt": 1} and "Failed runs" not in table


# ---------------------------------------------------------------------------------------------
# The report from a hand-made runs.jsonl, and the flags
# ---------------------------------------------------------------------------------------------
def record(core, num_steps, seed, final_return, final_success, status="ok", lr="1e-3"):
    config = dict(env_id="MiniGrid-MemoryS7-v0", core=core, num_steps=num_steps, seed=seed, sets={"learning-rate": lr})
    r = dict(
        key=study.run_key(config),
        config=config,
        status=status,
        run_name=study.run_key(config),
        log="x.log",
        returncode=0 if status == "ok" else 1,
        wall_time=1.0,
        study_command="python unroll_study.py",
        fixed=dict(script="rtrl_a2c_minigrid.py", total_timesteps=1000, extra=[]),
    )
    if status == "ok":
        curve = dict(step=[250, 750], episodic_return=[None, final_return], success=[0.0, final_success])
        r.update(
            curve=curve,
            metrics=dict(
                final_return=final_return,
                final_success=final_success,
                final_episodes=5,
                episodes=9,
                eval_return=None,
                eval_success=None,
                eval_episodes=0,
                sps=100.0,
            ),
        )
    else:
        r.update(error="exit code 1", log_tail="boom\n")
    return r


def test_cells_are_mean_and_sample_sd_over_seeds(tmp_path):
    returns, successes = [0.2, 0.5, 0.65], [0.25, 0.5, 1.0]
    records = [record("tbptt", 8, s, r, p) for s, r, p in zip((1, 2, 3), returns, successes)]
    records += [
        record("rtrl", 8, 1, None, None, status="failed"),
        record("rtrl", 8, 1, 0.9, 1.0),  # failed, retried
        record("rtrl", 2, 1, 0.4, 0.5),
        record("rtrl", 2, 2, 0.6, 0.5),
        record("tbptt", 8, 1, 0.7, 0.7, lr="3e-4"),
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert study.main(["--report-only", "--out-dir", str(tmp_path)]) == 0
    results, rows, table = read(tmp_path)
    cells = {(c["core"], c["num_steps"], c["sets"]["learning-rate"]): c for c in results["cells"]}
    assert list(cells) == [("rtrl", 2, "1e-3"), ("rtrl", 8, "1e-3"), ("tbptt", 8, "3e-4"), ("tbptt", 8, "1e-3")]
    tbptt = cells[("tbptt", 8, "1e-3")]
    mean, sd = sum(returns) / 3, math.sqrt(sum((r - sum(returns) / 3) ** 2 for r in returns) / 2)
    assert tbptt["n"] == 3 and tbptt["seeds"] == [1, 2, 3] and tbptt["final_return"]["values"] == returns
    assert tbptt["final_return"]["mean"] == pytest.approx(mean) and tbptt["final_return"]["sd"] == pytest.approx(sd)
    assert tbptt["final_success"]["sd"] == pytest.approx(statistics.stdev(successes))
    assert cells[("rtrl", 8, "1e-3")]["n"] == 1 and cells[("rtrl", 8, "1e-3")]["final_return"]["mean"] == 0.9
    assert cells[("rtrl", 2, "1e-3")]["final_return"]["sd"] == pytest.approx(math.sqrt(0.02))
    each = ", ".join(f"{r:.3g}" for r in returns)
    assert f"| tbptt, learning-rate=1e-3 | – | {mean:.3f} ± {sd:.3f} (0.58 ± 0.38) n=3 [{each}] |" in table
    assert "| rtrl, learning-rate=1e-3 | 0.500 ± 0.141 (0.50 ± 0.00) n=2 [0.4, 0.6] | 0.900 (1.00) n=1 [0.9] |" in table
    assert "Failed runs" not in table and len(rows) == len(records)  # the retried rtrl run is no failure any more
    assert results["swept"] == {"learning-rate": ["3e-4", "1e-3"]}


def test_quick_keeps_the_flags_you_pass():
    flags = ["--total-timesteps", "1000000", "--seeds", "1", "2", "--extra", "--num-envs 4 --gamma 0.9"]
    args, extra, sets = study.parse_args(["--quick", *flags, "--out-dir", "o", "--work-dir", "w"])
    assert args.total_timesteps == 1_000_000 and args.seeds == (1, 2) and args.cores == study.QUICK["cores"]
    assert extra == ["--num-envs", "4", "--hidden-size", "8", "--eval-episodes", "1", "--gamma", "0.9"]
    args, extra, sets = study.parse_args(["--set", "learning-rate=3e-4,1e-3", "--set", "ent-coef=0.01"])
    assert (args.total_timesteps, args.cores, extra) == (study.DEFAULTS["total_timesteps"], study.CORES, [])
    assert sets == {"learning-rate": ["3e-4", "1e-3"], "ent-coef": ["0.01"]}
    assert len(study.grid(args, sets)) == 2 * 3 * 4 * 3  # swept values x unrolls x cores x seeds


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--cores", "rtrl", "tbpt"], "unknown core 'tbpt'; did you mean tbptt?"),
        (["--num-steps"], "--num-steps needs at least one value"),
        (["--seeds", "1", "1"], "--seeds repeats a value"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--set", "learning-rate"], "--set wants NAME=V1,V2,..."),
        (["--set", "learning-rate=1e-3,"], "--set wants NAME=V1,V2,..."),
        (["--set", "seed=1,2"], "--set may not sweep --seed"),
        (["--extra", "--seed 3"], "--extra may not contain --seed"),
        (["--extra", "--gamma 0.9", "--set", "gamma=0.9,0.99"], "--gamma is both in --extra and in --set"),
        (["--script", "nope.py"], "the training script nope.py does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        study.main([*flags, "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not os.listdir(tmp_path)
