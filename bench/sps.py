"""End-to-end steps/s of rtrl_a2c_atari.py with --core rtrl, tbptt and ff, and where an iteration's time goes.

The training runs are the script as a user runs it, one after another in this one invocation, with the same
flags; steps/s is the steady state (from the end of the first iteration to the last, from the event file's
wall times). The split replays one iteration piece by piece with the script's own modules, in the order
`compute_gradients` runs them, and puts the script's `compute_gradients` itself beside it as a check.

    python bench/sps.py                        # --tiny for a seconds-long smoke run
"""

import glob
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common import ROOT, load_script, machine, print_table

SCRIPT = "rtrl_a2c_atari.py"
CLEANRL_LSTM_SPS = 224  # CleanRL ppo_atari_lstm.py on Breakout on these 2-core machines (issue 6)
PARTS = ("rollout: stem forward", "rollout: cell, heads, sampling", "update: cell forward",
         "update: heads forward+backward", "update: cell backward to x", "update: RTRL (chunked)",
         "update: cell backward (BPTT)", "update: stem backward", "update: grad clip + RMSprop")  # fmt: skip
CHECK = "check: the script's compute_gradients"


@dataclass
class Args:
    iterations: int = 6
    """training iterations per run (steps/s is measured over all but the first)"""
    rounds: int = 2
    """runs per core, interleaved (rtrl, tbptt, ff, rtrl, ...); the best is reported"""
    cores: tuple[str, ...] = ("rtrl", "tbptt", "ff")
    """the --core values to compare"""
    num_envs: int = 16
    """--num-envs of the runs and the split"""
    num_steps: int = 50
    """--num-steps of the runs and the split"""
    hidden_size: int = 256
    """--hidden-size of the runs and the split"""
    split_repeats: int = 3
    """replays of one iteration for the split (the minimum of each part is reported)"""
    tiny: bool = False
    """2 envs x 4 steps, hidden size 8, one round: a smoke run (the numbers mean nothing)"""


def steady_sps(run_dir):
    """Steps/s between the first and the last charts/SPS event (so the first iteration's start-up is out)."""
    (event_file,) = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    acc = EventAccumulator(event_file, size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("charts/SPS")
    first, last = events[0], events[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time), last.value


def training_run(core, args):
    """(steady steps/s, the script's own charts/SPS at the end) of one run of the script, in a scratch dir."""
    flags = ["--core", core, "--num-envs", args.num_envs, "--num-steps", args.num_steps, "--hidden-size",
             args.hidden_size, "--total-timesteps", args.iterations * args.num_envs * args.num_steps,
             "--eval-episodes", 0]  # fmt: skip
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, os.path.join(ROOT, SCRIPT), *map(str, flags)]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
        return steady_sps(run_dir)


def fake_rollout(script, T, B, g):
    """A rollout with the shapes and flags of a real one; the values do not change the cost."""
    return script.Rollout(
        obs=torch.randint(0, 256, (T, B, 4, 84, 84), generator=g, dtype=torch.uint8),
        last_rewards=torch.randn(T, B, generator=g), firsts=torch.rand(T, B, generator=g) < 0.01,
        deads=torch.rand(T, B, generator=g) < 0.01, actions=torch.randint(0, 4, (T, B), generator=g),
        rewards=torch.randn(T, B, generator=g), terms=torch.rand(T, B, generator=g) < 0.01,
        values=torch.randn(T, B, generator=g),
    )  # fmt: skip


def iteration_split(script, core, args):
    """Seconds per iteration of each part (min over replays), and of the script's compute_gradients."""
    T, B = args.num_steps, args.num_envs
    g = torch.Generator().manual_seed(0)
    agent = script.Agent((4, 84, 84), 4, args.hidden_size, core)
    cfg = script.Args(core=core)
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=cfg.learning_rate, alpha=cfg.rms_alpha, eps=cfg.rms_eps)
    rollout, returns = fake_rollout(script, T, B, g), torch.randn(T, B, generator=g)
    c0, sens0 = agent.cell.initial_state(B)
    best = dict.fromkeys((*PARTS, CHECK), math.inf)

    def timed(part, fn):
        start = time.perf_counter()
        out = fn()
        seconds[part] += time.perf_counter() - start
        return out

    for _ in range(args.split_repeats):
        seconds = dict.fromkeys(best, 0.0)
        # the rollout: the stem with autograd (its graphs are kept for the update), then cell and heads
        features, c = [], c0
        for t in range(T):
            obs, last_reward = rollout.obs[t], rollout.last_rewards[t]
            features.append(timed("rollout: stem forward", lambda: agent.features(obs, last_reward)))
            c = timed("rollout: cell, heads, sampling", lambda: agent.act(features[-1], c, rollout.firsts[t]))[2]
        # the update, as compute_gradients runs it
        optimizer.zero_grad()
        resets = agent.resets(rollout.firsts)
        x = torch.stack(features)
        x_leaf = x.detach().requires_grad_()
        c = timed("update: cell forward", lambda: agent.cell(x_leaf, c0, resets))
        c_leaf = c.detach().requires_grad_()

        def heads():  # a loss of the same shapes as the script's
            logits, value = agent.heads(x_leaf, c_leaf)
            logp = torch.log_softmax(logits, -1)
            (logp.gather(-1, rollout.actions[..., None]).sum() + ((returns - value) ** 2).sum()).backward()

        timed("update: heads forward+backward", heads)
        if core == "rtrl":
            timed("update: cell backward to x", lambda: c.backward(c_leaf.grad, inputs=[x_leaf]))
            dl_dc = c_leaf.grad
            timed("update: RTRL (chunked)", lambda: agent.cell.rtrl(x_leaf.detach(), c0, resets, sens0, dl_dc))
        else:
            cell_inputs = [x_leaf, *agent.cell.parameters()]
            timed("update: cell backward (BPTT)", lambda: c.backward(c_leaf.grad, inputs=cell_inputs))
        timed("update: stem backward", lambda: x.backward(x_leaf.grad))

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()

        timed("update: grad clip + RMSprop", optimizer_step)

        # the script's own update on the same rollout (stem graphs kept as in the rollout), as a check
        rollout.features = torch.stack([agent.features(rollout.obs[t], rollout.last_rewards[t]) for t in range(T)])
        optimizer.zero_grad()
        update = script.compute_gradients
        timed(CHECK, lambda: update(agent, rollout, returns, c0, sens0, cfg))
        for part, s in seconds.items():
            best[part] = min(best[part], s)
    return best


def main(args):
    if args.tiny:
        args.iterations, args.rounds, args.num_envs, args.num_steps, args.hidden_size = 2, 1, 2, 4, 8
        args.split_repeats = 1
    script = load_script(SCRIPT)
    print(f"machine: {machine()}")
    T, B = args.num_steps, args.num_envs
    print(f"{SCRIPT}: {B} envs x {T} steps = {T * B} steps per iteration, hidden size {args.hidden_size}")

    sps = defaultdict(list)
    for _ in range(args.rounds):
        for core in args.cores:
            sps[core].append(training_run(core, args))
    best = {core: max(runs) for core, runs in sps.items()}
    reference = best["tbptt"][0] if "tbptt" in best else None
    print(f"\nsteps/s, best of {args.rounds} interleaved runs of {args.iterations} iterations each "
          f"(steady: after the first iteration)")  # fmt: skip
    rows = [[core, f"{s:.0f}", f"{script_sps:.0f}", f"{s / reference:.2f}x" if reference else "-",
             f"{s / CLEANRL_LSTM_SPS:.2f}x"] for core, (s, script_sps) in best.items()]  # fmt: skip
    print_table(["core", "steps/s", "charts/SPS at end", "vs tbptt", f"vs CleanRL LSTM ({CLEANRL_LSTM_SPS})"], rows)

    splits = {core: iteration_split(script, core, args) for core in args.cores}
    print(f"\nseconds per iteration, in process (min over {args.split_repeats} replays; "
          f"env stepping etc. = {T * B} steps / steady steps/s - the parts)")  # fmt: skip
    iteration = {core: T * B / best[core][0] for core in args.cores}
    sums = {core: {"update": sum(splits[core][p] for p in PARTS if p.startswith("update")),
                   "all": sum(splits[core][p] for p in PARTS)} for core in args.cores}  # fmt: skip
    rows = [[part, *(f"{splits[core][part]:.3f}" for core in args.cores)] for part in PARTS]
    rows.append(["env stepping and the rest", *(f"{iteration[core] - sums[core]['all']:.3f}" for core in args.cores)])
    rows.append(["iteration (from steps/s)", *(f"{iteration[core]:.3f}" for core in args.cores)])
    rows.append(["update: sum of its parts", *(f"{sums[core]['update']:.3f}" for core in args.cores)])
    rows.append([CHECK, *(f"{splits[core][CHECK]:.3f}" for core in args.cores)])
    print_table(["part", *args.cores], rows)


if __name__ == "__main__":
    main(tyro.cli(Args))
