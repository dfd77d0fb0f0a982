"""Env steps/s of one process training K agents (rtrl_a2c_bsuite.py --num-seeds K) against K single-agent processes
doing the same work, side by side in one run, and where the population's time goes.

Every run is the script as a user runs it, one thread, one after another, with the same flags (the setting, the
episodes, seeds 1..K). A round runs the commit before populations (`--baseline`) and this script alone at seed 1, each
population, then the single runs of seeds 1..max(K); the best of the rounds counts for each run. A run's rate is its
last charts/SPS (an agent's env steps over its training loop, start-up excluded: the comparison does not credit the
population with the K - 1 interpreter starts it saves); a population makes K times that, K single runs their steps
over the sum of their times. The split of the best K is bench/bsuite_time.py's, in this process.

    python bench/population.py              # memory_len/9 (L = 10), 2,000 episodes, K = 1 4 10 20
"""

import glob
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace

import bsuite_time
import tyro
from common import ROOT, fail, machine, print_table, set_threads
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class Args:
    env_id: str = "memory_len/9"
    """the bsuite id of every run"""
    num_episodes: int = 2000
    """episodes per agent"""
    ks: tuple[int, ...] = (1, 4, 10, 20)
    """population sizes"""
    rounds: int = 2
    """rounds of every run; the best counts"""
    baseline: str = "87a19d6"
    """the commit before populations, whose rtrl_a2c_bsuite.py the single run must not be slower than"""


def last_sps(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    steps = acc.Scalars("charts/SPS")
    return steps[-1].step, steps[-1].value


def run(script, cwd, name, args, seed, num_seeds=None):
    """One run of `script`; (env steps of an agent, its steps/s), from its first agent's event file."""
    flags = ["--env-id", args.env_id, "--num-episodes", str(args.num_episodes), "--seed", str(seed)]
    flags += [] if num_seeds is None else ["--num-seeds", str(num_seeds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, script, *flags, "--run-name", name]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        fail(f"{os.path.basename(script)} {' '.join(flags)} failed: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    return last_sps(sorted(glob.glob(os.path.join(cwd, "runs", f"{name}*")))[0])


if __name__ == "__main__":
    args = tyro.cli(Args)
    if min(args.ks) < 1 or args.rounds < 1 or args.num_episodes < 1:
        fail(f"--ks, --rounds and --num-episodes must be at least 1, got {args.ks}, {args.rounds}, {args.num_episodes}")
    set_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = os.path.join(tmp, "baseline_rtrl_a2c_bsuite.py")
        git = ["git", "-C", ROOT, "show", f"{args.baseline}:rtrl_a2c_bsuite.py"]
        show = subprocess.run(git, capture_output=True, text=True)
        if show.returncode:
            fail(f"--baseline {args.baseline}: no rtrl_a2c_bsuite.py there ({show.stderr.strip()})")
        with open(baseline, "w") as f:
            f.write(show.stdout)
        script = os.path.join(ROOT, "rtrl_a2c_bsuite.py")
        print(f"machine: {machine()}")
        best = {}  # run -> (steps, best steps/s)
        for r in range(args.rounds):
            runs = {"baseline": (baseline, 1, None), **{f"population {k}": (script, 1, k) for k in args.ks}}
            runs.update({f"seed {s}": (script, s, None) for s in range(1, max(args.ks) + 1)})
            for i, (key, (path, seed, k)) in enumerate(runs.items()):
                steps, sps = run(path, tmp, f"r{r}_{i}", args, seed, k)
                best[key] = (steps, max(sps, best.get(key, (0, 0))[1]))
        rows, ratios = [], {}
        for k in args.ks:
            together = k * best[f"population {k}"][1]
            seeds = [best[f"seed {s}"] for s in range(1, k + 1)]
            apart = sum(steps for steps, _ in seeds) / sum(steps / sps for steps, sps in seeds)
            ratios[k] = together / apart
            rows.append([str(k), f"{together:,.0f}", f"{apart:,.0f}", f"{ratios[k]:.2f}x"])
        print(f"\nrtrl_a2c_bsuite.py --env-id {args.env_id} --num-episodes {args.num_episodes}, defaults otherwise")
        print(f"env steps/s of all agents, best of {args.rounds} rounds, 1 thread, one run at a time")
        print_table(["K", "one process, --num-seeds K", "K single processes", "ratio"], rows)
        single, old = best["seed 1"][1], best["baseline"][1]
        print(f"\none agent (seed 1): {single:,.0f} steps/s; the script at {args.baseline}: {old:,.0f}; {single / old:.2f}x")
    k = max(ratios, key=ratios.get)
    print(f"\nwhere the time goes at K = {k} (bench/bsuite_time.py, rtrl):")
    split = SimpleNamespace(env_id=args.env_id, num_seeds=k)
    bsuite_time.run("rtrl", split, 16)  # warm-up
    headers = ["core", "env steps", "seconds", "steps/s", "bsuite", "Envs.step", "act", "gradients", "RMSprop", "logging"]
    print_table(headers + ["rest"], [bsuite_time.run("rtrl", split, args.num_episodes)])
