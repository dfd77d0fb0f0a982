"""Smoke runs of bench/ at tiny sizes: each benchmark runs and prints its tables. No time is asserted."""

import os
import re

import helpers
import pytest
import torch
import tyro

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
SCRIPTS = ("rtrl_a2c_atari.py", "rtrl_a2c_procgen.py", "rtrl_impala_dmlab.py", "rtrl_a2c_minigrid.py")


def run_bench(tmp_path, name, *flags):
    proc = helpers.run_script(os.path.join(BENCH, name), tmp_path, "--tiny", *flags)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("machine: ") and " cores, torch " in proc.stdout.splitlines()[0]
    return proc.stdout


def table(stdout, first_header, skip=0):
    """Rows (lists of cells) of the table whose header line starts with `first_header` (after `skip` such tables)."""
    lines = stdout.splitlines()
    start = [i for i, line in enumerate(lines) if line.split()[:1] == [first_header]][skip]
    assert set(lines[start + 1]) <= {"-", " "}
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith(("note:", "figure")):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return lines[start], rows


def test_rtrl_cost_times_every_script_and_its_three_passes_agree(tmp_path):
    out = run_bench(tmp_path, "rtrl_cost.py", "--repeats", "1", "--step-repeats", "1")
    header, rows = table(out, "script")
    assert [row[0] for row in rows] == list(SCRIPTS)
    for row in rows:
        assert len(row) == len(re.split(r"\s{2,}", header.strip())) == 11
        assert all(float(cell) >= 0 for cell in row[2:8])  # times in ms, memory in MiB
        assert row[8].endswith("x") and row[9].endswith("x")
        assert float(row[10]) < 1e-4  # chunked and step RTRL give BPTT's gradient
    header, rows = table(out, "script", skip=1)  # the update's pass, with dL/dx, vs BPTT with input gradients
    assert [row[0] for row in rows] == [s for s in SCRIPTS for _ in ("Atari", "MiniGrid")]
    assert [row[1] for row in rows] == ["Atari", "MiniGrid"] * len(SCRIPTS)
    for row in rows:
        assert len(row) == len(re.split(r"\s{2,}", header.strip())) == 9
        assert all(float(cell) > 0 for cell in row[3:6]) and row[6].endswith("x") and row[7].endswith("x")
        assert float(row[8]) < 1e-4  # rtrl_scan gives BPTT's weight and input gradients


def test_memory_vs_history_prints_both_methods_and_saves_the_figure(tmp_path):
    figure = tmp_path / "memory.png"
    out = run_bench(tmp_path, "memory_vs_history.py", "--plot", str(figure))
    _, rows = table(out, "L")
    assert [int(row[0]) for row in rows] == [8, 16, 32]
    for row in rows:
        assert float(row[1]) >= 0 and float(row[2]) >= 0 and float(row[5]) < 1e-4  # RTRL equals BPTT
    assert figure.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))


def test_memory_vs_history_stops_bptt_at_the_budget(tmp_path):
    out = run_bench(tmp_path, "memory_vs_history.py", "--budget-gib", "0", "--plot", "")
    _, rows = table(out, "L")
    assert rows[0][3] != "-" and all(row[3].startswith("over budget") for row in rows[1:])


@pytest.mark.parametrize("script", ["rtrl_a2c_atari.py", "rtrl_a2c_minigrid.py"])
def test_sps_runs_every_core_and_splits_the_iteration(tmp_path, script):
    out = run_bench(tmp_path, "sps.py", "--script", script)
    assert out.splitlines()[1].startswith(f"{script}: ")
    _, rows = table(out, "core")
    assert [row[0] for row in rows] == ["rtrl", "tbptt", "ff"]
    assert all(float(row[1]) > 0 for row in rows) and rows[1][3] == "1.00x"
    assert re.search(r"^rtrl / tbptt steps/s: \d+\.\d\dx", out, re.M)
    _, parts = table(out, "part")
    names = [row[0] for row in parts]
    for part in (
        "rollout: stem forward",
        "update: RTRL (chunked)",
        "update: stem backward",
        "iteration (from steps/s)",
        "check: the script's compute_gradients",
    ):
        assert part in names
    rtrl = dict((row[0], float(row[1])) for row in parts)
    assert rtrl["update: RTRL (chunked)"] > 0 and rtrl["iteration (from steps/s)"] > 0
    assert "CleanRL" not in out  # no figure from another machine: a ratio only beside a run of CleanRL here


# CleanRL's cleanrl/ppo_atari_lstm.py as far as the benchmark sees it: tyro flags, its cleanrl_utils import (from the
# checkout's root), and after each iteration `SPS: n` printed and charts/SPS written under runs/, at a known pace
FAKE_CLEANRL = """
import argparse, os, sys, time
from torch.utils.tensorboard import SummaryWriter
import cleanrl_utils

parser = argparse.ArgumentParser()
for flag, default in (("--total-timesteps", 10_000_000), ("--num-envs", 8), ("--num-steps", 128)):
    parser.add_argument(flag, type=int, default=default)
parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True)
args = parser.parse_args()
with open(os.path.join(os.path.dirname(__file__), "argv.txt"), "w") as f:
    f.write(" ".join(sys.argv[1:]))
writer = SummaryWriter(f"runs/BreakoutNoFrameskip-v4__ppo_atari_lstm__1__{int(time.time())}")
start, global_step = time.time(), 0
for iteration in range(args.total_timesteps // (args.num_envs * args.num_steps)):
    time.sleep(args.num_envs * args.num_steps / 80)  # 80 steps/s
    global_step += args.num_envs * args.num_steps
    print("SPS:", int(global_step / (time.time() - start)))
    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start)), global_step)
writer.close()
"""


def test_sps_runs_cleanrl_side_by_side_when_given_a_checkout(tmp_path):
    checkout = tmp_path / "cleanrl-checkout"
    (checkout / "cleanrl").mkdir(parents=True)
    (checkout / "cleanrl_utils").mkdir()
    (checkout / "cleanrl_utils" / "__init__.py").write_text("")
    (checkout / "cleanrl" / "ppo_atari_lstm.py").write_text(FAKE_CLEANRL)
    out = run_bench(tmp_path, "sps.py", "--cores", "tbptt", "--cleanrl", str(checkout))
    # as many steps as one run of the script (2 iterations of 2 x 4 under --tiny) but at least 2 of its own (4 x 4)
    assert (checkout / "cleanrl" / "argv.txt").read_text() == "--total-timesteps 32 --num-envs 4 --num-steps 4 --no-cuda"
    header, rows = table(out, "core")
    cleanrl_sps = float(re.fullmatch(r".*vs CleanRL \((\d+)\)", header)[1])
    assert 60 < cleanrl_sps <= 84, header  # the fake's pace, measured from its event file's wall times
    ((core, sps, _, _, ratio),) = rows
    assert core == "tbptt" and float(ratio[:-1]) == pytest.approx(float(sps) / cleanrl_sps, abs=0.025)  # both rounded
    assert f"CleanRL: {checkout / 'cleanrl' / 'ppo_atari_lstm.py'} at its defaults" in out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--cleanrl", "nowhere"], "--cleanrl nowhere: no cleanrl/ppo_atari_lstm.py there"),
        (["--cleanrl", "CHECKOUT", "--script", "rtrl_a2c_minigrid.py"], "it needs --script rtrl_a2c_atari.py"),
        (["--cleanrl", "CHECKOUT", "--cleanrl-python", "no-such-python"], "--cleanrl-python no-such-python: no such"),
    ],
)
def test_sps_refuses_what_is_not_a_cleanrl_checkout(tmp_path, monkeypatch, capsys, flags, message):
    (tmp_path / "cleanrl").mkdir()
    (tmp_path / "cleanrl" / "ppo_atari_lstm.py").write_text("")
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.chdir(tmp_path)
    import sps

    flags = [str(tmp_path) if flag == "CHECKOUT" else flag for flag in flags]
    helpers.bad_input_in_process(lambda argv: sps.cleanrl_script(tyro.cli(sps.Args, args=argv)), flags, message, capsys)


def test_a_benchmark_asked_for_a_gpu_without_one_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCH)
    import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    helpers.bad_input_in_process(
        lambda argv: common.pick_device(*argv), ["cuda"], "--device cuda: no CUDA device found", capsys
    )
    assert common.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "name,flags,message",
    [
        ("rtrl_cost.py", ["--threads", "-1"], "--threads must be at least 0, got -1"),
        ("memory_vs_history.py", ["--threads", "-2"], "--threads must be at least 0, got -2"),
        ("memory_vs_history.py", ["--budget-gib", "-1"], "--budget-gib must be at least 0, got -1.0"),
        ("multilayer_cost.py", ["--threads", "-1"], "--threads must be at least 0, got -1"),
    ],
)
def test_a_benchmark_given_bad_input_says_so_in_one_line_and_exits_2(tmp_path, name, flags, message):
    proc = helpers.run_script(os.path.join(BENCH, name), tmp_path, *flags)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "machine:" not in proc.stdout  # refused before any measurement


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["rtrl_cost.py", "memory_vs_history.py"])
def test_benchmarks_run_on_a_gpu(tmp_path, name):
    out = run_bench(tmp_path, name, "--device", "cuda", *(["--plot", ""] if name == "memory_vs_history.py" else []))
    assert "device cuda" in out.splitlines()[0] and "CUDA memory allocated" in out


def test_bsuite_time_splits_real_runs_of_the_script(tmp_path):
    proc = helpers.run_script(os.path.join(BENCH, "bsuite_time.py"), tmp_path, "--num-episodes", "32", "--cores", "rtrl", "ff")
    assert proc.returncode == 0 and proc.stdout.startswith("machine: "), proc.stderr
    header, rows = table(proc.stdout, "core")
    assert header.split()[-7:] == ["bsuite", "Envs.step", "act", "gradients", "RMSprop", "logging", "rest"]
    assert [row[0] for row in rows] == ["rtrl", "ff"]
    for row in rows:  # 32 episodes of 51 steps, in rollouts of 16 envs x 4 steps
        assert row[1] == f"{(-(-32 * 51 // 64)) * 64:,}" and float(row[2]) > 0
        assert 97 <= sum(int(cell.rstrip("%")) for cell in row[4:]) <= 103  # the parts make up the span, to rounding


def test_population_compares_one_process_with_k_single_ones_and_the_commit_before(tmp_path):
    flags = ("--num-episodes", "32", "--ks", "1", "2", "--rounds", "1")
    proc = helpers.run_script(os.path.join(BENCH, "population.py"), tmp_path, *flags)
    assert proc.returncode == 0 and proc.stdout.startswith("machine: "), proc.stderr
    header, rows = table(proc.stdout, "K")
    assert [row[0] for row in rows] == ["1", "2"] and all(row[-1].endswith("x") for row in rows)
    for row in rows:  # the ratio is the two rates' quotient, to rounding
        together, apart = (float(cell.replace(",", "")) for cell in row[1:3])
        assert float(row[-1][:-1]) == pytest.approx(together / apart, abs=0.006)
    assert "the script at 87a19d6:" in proc.stdout and "where the time goes at K = " in proc.stdout
    assert not os.listdir(tmp_path)  # every run in a temp dir, removed


def test_population_refuses_a_baseline_that_does_not_exist(tmp_path):
    proc = helpers.run_script(os.path.join(BENCH, "population.py"), tmp_path, "--baseline", "no-such-commit")
    assert proc.returncode == 2 and "--baseline no-such-commit: no rtrl_a2c_bsuite.py there" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "machine:" not in proc.stdout
