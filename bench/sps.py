"""End-to-end steps/s of an A2C script with --core rtrl, tbptt and ff, and where an iteration's time goes.

The script is rtrl_a2c_atari.py (the default) or rtrl_a2c_minigrid.py (`--script`), at its own defaults
unless told. The training runs are the script as a user runs it, one after another in this one invocation,
with the same flags; steps/s is the steady state (from the end of the first iteration to the last, from the
event file's wall times). The split replays one iteration piece by piece with the script's own modules, in
the order `compute_gradients` runs them, and puts the script's `compute_gradients` itself beside it as a check.

With `--cleanrl` pointing at a CleanRL checkout, CleanRL's ppo_atari_lstm.py (an LSTM agent on Atari, at its
own defaults) runs in the same rounds, for as many steps, measured the same way, and each core's steps/s is
also given as a ratio to it. Without it, no ratio to CleanRL is printed: a figure from another machine says
nothing about this one.

    python bench/sps.py                        # --tiny for a seconds-long smoke run
    python bench/sps.py --script rtrl_a2c_minigrid.py
    python bench/sps.py --cleanrl ~/cleanrl    # a CleanRL checkout, with its requirements installed
"""

import glob
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from common import ROOT, fail, load_script, machine, pick_device, print_table, sync
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# what the bench needs to know of each script: its observations and actions, whether its rollout keeps the
# stem's graphs for the update (Atari) or the update runs the stem again (MiniGrid's small MLP), and how many
# iterations a run needs for a steady figure
SCRIPTS = {
    "rtrl_a2c_atari.py": dict(obs_shape=(4, 84, 84), num_actions=4, keeps_stem_graphs=True, iterations=6, rounds=2),
    "rtrl_a2c_minigrid.py": dict(obs_shape=(7 * 7 * 3 + 1,), num_actions=3, keeps_stem_graphs=False, iterations=200, rounds=3),
}
CLEANRL = os.path.join("cleanrl", "ppo_atari_lstm.py")  # in a CleanRL checkout
# runs CleanRL's script (argv[1]) as `python script flags` would, after importing ale_py if it is there: ale-py 0.9
# registers the Atari envs on import, no longer through the entry point gymnasium 0.29 reads, and the script does not
CLEANRL_LAUNCH = """import os, runpy, sys
try:
    import ale_py
except ImportError:
    pass
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""
PARTS = (
    "rollout: stem forward",
    "rollout: cell, heads, sampling",
    "update: stem forward",
    "update: cell forward",
    "update: heads forward+backward",
    "update: RTRL (chunked)",
    "update: cell backward (BPTT)",
    "update: stem backward",
    "update: grad clip + RMSprop",
)
CHECK = "check: the script's compute_gradients"


@dataclass
class Args:
    script: Literal["rtrl_a2c_atari.py", "rtrl_a2c_minigrid.py"] = "rtrl_a2c_atari.py"
    """the A2C script to measure"""
    iterations: int = 0
    """training iterations per run (steps/s is measured over all but the first); 0: 6 for Atari, 200 for MiniGrid"""
    rounds: int = 0
    """runs per core, interleaved (rtrl, tbptt, ff, rtrl, ...); the best is reported; 0: 2 for Atari, 3 for MiniGrid"""
    cores: tuple[str, ...] = ("rtrl", "tbptt", "ff")
    """the --core values to compare"""
    num_envs: int = 0
    """--num-envs of the runs and the split (0: the script's default)"""
    num_steps: int = 0
    """--num-steps of the runs and the split (0: the script's default)"""
    hidden_size: int = 0
    """--hidden-size of the runs and the split (0: the script's default)"""
    split_repeats: int = 3
    """replays of one iteration for the split (the minimum of each part is reported)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where the runs (--cuda / --no-cuda) and the split run; cuda: the split's timers synchronize"""
    cleanrl: str = ""
    """a CleanRL checkout (or its cleanrl/ppo_atari_lstm.py): run it beside rtrl_a2c_atari.py and print the ratios"""
    cleanrl_python: str = sys.executable
    """the Python that has CleanRL's requirements (gymnasium[atari], its cleanrl_utils), e.g. its venv's"""
    tiny: bool = False
    """2 envs x 4 steps, hidden size 8, one round: a smoke run (the numbers mean nothing)"""


def cleanrl_script(args):
    """The path of CleanRL's ppo_atari_lstm.py from --cleanrl (the checkout or the file); a one-line error otherwise."""
    path = os.path.expanduser(args.cleanrl)
    path = os.path.join(path, CLEANRL) if os.path.isdir(path) else path
    if not path.endswith(CLEANRL) or not os.path.isfile(path):
        fail(f"--cleanrl {args.cleanrl}: no {CLEANRL} there (give a CleanRL checkout, or that file)")
    if args.script != "rtrl_a2c_atari.py":
        fail(f"--cleanrl compares with CleanRL's Atari LSTM agent: it needs --script rtrl_a2c_atari.py, not {args.script}")
    if shutil.which(args.cleanrl_python) is None:
        fail(f"--cleanrl-python {args.cleanrl_python}: no such program")
    return os.path.abspath(path)


def steady_sps(run_dir):
    """Steps/s between the first and the last charts/SPS event (so the first iteration's start-up is out)."""
    (event_file,) = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    acc = EventAccumulator(event_file, size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("charts/SPS")
    first, last = events[0], events[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time), last.value


def run_and_measure(cmd, env=None, hint=""):
    """(steady steps/s, the script's own charts/SPS at the end) of one run of `cmd` in a scratch dir, which writes its
    TensorBoard scalars under runs/, as CleanRL's scripts do; if it fails, its last line of stderr (and `hint`)."""
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
            fail(f"{' '.join(cmd)} exited with {proc.returncode}: {last}{hint}")
        (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
        return steady_sps(run_dir)


def training_run(core, args):
    """One run of the script with --core `core` (see run_and_measure)."""
    flags = [
        "--core",
        core,
        "--num-envs",
        args.num_envs,
        "--num-steps",
        args.num_steps,
        "--hidden-size",
        args.hidden_size,
        "--total-timesteps",
        args.iterations * args.num_envs * args.num_steps,
        "--eval-episodes",
        0,
        "--cuda" if args.device == "cuda" else "--no-cuda",
    ]
    return run_and_measure([sys.executable, os.path.join(ROOT, args.script), *map(str, flags)])


def cleanrl_run(path, args):
    """One run of CleanRL's ppo_atari_lstm.py at its defaults (its Breakout, 8 envs x 128 steps, PPO's epochs), for
    as many steps as one of the script's runs but at least 2 of its iterations (steady steps/s needs 2 SPS events);
    the checkout's root on PYTHONPATH for its cleanrl_utils."""
    num_envs, num_steps = (4, 4) if args.tiny else (8, 128)
    steps = max(args.iterations * args.num_envs * args.num_steps, 2 * num_envs * num_steps)
    flags = ["--total-timesteps", steps, "--num-envs", num_envs, "--num-steps", num_steps]
    flags.append("--cuda" if args.device == "cuda" else "--no-cuda")
    root = os.path.dirname(os.path.dirname(path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    hint = " (--cleanrl-python: a Python with CleanRL's requirements)"
    return run_and_measure([args.cleanrl_python, "-c", CLEANRL_LAUNCH, path, *map(str, flags)], env, hint)


def fake_rollout(script, obs_shape, num_actions, T, B, g, device):
    """A rollout with the shapes and flags of a real one, on `device`; the values do not change the cost."""
    high = 256 if len(obs_shape) == 3 else 3  # pixels, or MiniGrid's (object, colour, state) ids
    fields = dict(
        obs=torch.randint(0, high, (T, B, *obs_shape), generator=g, dtype=torch.uint8),
        last_rewards=torch.randn(T, B, generator=g),
        firsts=torch.rand(T, B, generator=g) < 0.01,
        terminal_obs=torch.rand(T, B, generator=g) < 0.01,
        actions=torch.randint(0, num_actions, (T, B), generator=g),
        rewards=torch.randn(T, B, generator=g),
        terms=torch.rand(T, B, generator=g) < 0.01,
        values=torch.randn(T, B, generator=g),
    )
    return script.Rollout(**{k: v.to(device) for k, v in fields.items()})


def iteration_split(script, core, args, device):
    """Seconds per iteration of each part (min over replays), and of the script's compute_gradients."""
    T, B = args.num_steps, args.num_envs
    known = SCRIPTS[args.script]
    g = torch.Generator().manual_seed(0)
    agent = script.Agent(known["obs_shape"], known["num_actions"], args.hidden_size, core).to(device)
    cfg = script.Args(core=core)
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=cfg.learning_rate, alpha=cfg.rms_alpha, eps=cfg.rms_eps)
    rollout = fake_rollout(script, known["obs_shape"], known["num_actions"], T, B, g, device)
    returns = torch.randn(T, B, generator=g).to(device)
    c0, sens0 = agent.cell.initial_state(B)
    best = dict.fromkeys((*PARTS, CHECK), math.inf)

    def timed(part, fn):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        seconds[part] += time.perf_counter() - start
        return out

    def copy(sens):  # the update may overwrite the carried sensitivities: every replay gets its own
        return {k: s.clone() for k, s in sens.items()}

    for _ in range(args.split_repeats):
        seconds = dict.fromkeys(best, 0.0)
        # the rollout: the stem (with autograd if its graphs are kept for the update), then cell and heads
        features, c = [], c0
        with torch.set_grad_enabled(known["keeps_stem_graphs"]):
            for t in range(T):
                obs, last_reward = rollout.obs[t], rollout.last_rewards[t]
                features.append(timed("rollout: stem forward", lambda: agent.features(obs, last_reward)))
                c = timed("rollout: cell, heads, sampling", lambda: agent.act(features[-1], c, rollout.firsts[t]))[2]
        # the update, as compute_gradients runs it
        optimizer.zero_grad()
        resets = agent.resets(rollout.firsts)
        if known["keeps_stem_graphs"]:
            x = torch.stack(features)
        else:
            x = timed("update: stem forward", lambda: agent.features(rollout.obs, rollout.last_rewards))
        x_leaf = x.detach().requires_grad_()
        heads = lambda: script.rollout_loss(agent, rollout, returns, x_leaf, c_leaf, cfg)[0].backward()
        if core == "rtrl":  # the cell's forward without autograd; one pass gives the cell's and the stem's gradients
            scan = timed("update: cell forward", lambda: agent.cell.scan(x_leaf.detach(), c0, resets))
            c_leaf = scan[0].requires_grad_()
            timed("update: heads forward+backward", heads)
            sens, dl_dc = copy(sens0), c_leaf.grad
            rtrl = lambda: agent.cell.rtrl_scan(x_leaf.detach(), scan, sens, dl_dc, overwrite=True)  # as compute_gradients
            dl_dx = timed("update: RTRL (chunked)", rtrl)[2]
            timed("update: stem backward", lambda: x.backward(x_leaf.grad + dl_dx))
        else:
            c = timed("update: cell forward", lambda: agent.cell(x_leaf, c0, resets))
            c_leaf = c.detach().requires_grad_()
            timed("update: heads forward+backward", heads)
            cell_inputs = [x_leaf, *agent.cell.parameters()]
            timed("update: cell backward (BPTT)", lambda: c.backward(c_leaf.grad, inputs=cell_inputs))
            timed("update: stem backward", lambda: x.backward(x_leaf.grad))

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()

        timed("update: grad clip + RMSprop", optimizer_step)

        # the script's own update on the same rollout (given the stem's graphs as the rollout keeps them, if it does)
        features = []
        if known["keeps_stem_graphs"]:
            features = [torch.stack([agent.features(rollout.obs[t], rollout.last_rewards[t]) for t in range(T)])]
        optimizer.zero_grad()
        update, sens = script.compute_gradients, copy(sens0)
        timed(CHECK, lambda: update(agent, rollout, *features, returns, c0, sens, cfg))
        for part, s in seconds.items():
            best[part] = min(best[part], s)
    return best


def main(args):
    cleanrl = cleanrl_script(args) if args.cleanrl else None
    script, known = load_script(args.script), SCRIPTS[args.script]
    defaults = script.Args()
    args.iterations, args.rounds = args.iterations or known["iterations"], args.rounds or known["rounds"]
    args.num_envs, args.num_steps = args.num_envs or defaults.num_envs, args.num_steps or defaults.num_steps
    args.hidden_size = args.hidden_size or defaults.hidden_size
    if args.tiny:
        args.iterations, args.rounds, args.num_envs, args.num_steps, args.hidden_size = 2, 1, 2, 4, 8
        args.split_repeats = 1
    device = pick_device(args.device)
    print(f"machine: {machine(device)}")
    T, B = args.num_steps, args.num_envs
    print(f"{args.script}: {B} envs x {T} steps = {T * B} steps per iteration, hidden size {args.hidden_size}")

    sps = defaultdict(list)
    for _ in range(args.rounds):
        for core in args.cores:
            sps[core].append(training_run(core, args))
        if cleanrl:
            sps["cleanrl"].append(cleanrl_run(cleanrl, args))
    best = {core: max(sps[core]) for core in args.cores}
    reference = best["tbptt"][0] if "tbptt" in best else None
    print(
        f"\nsteps/s, best of {args.rounds} interleaved runs of {args.iterations} iterations each "
        f"(steady: after the first iteration)"
    )
    rows = [
        [core, f"{s:.0f}", f"{script_sps:.0f}", f"{s / reference:.2f}x" if reference else "-"]
        for core, (s, script_sps) in best.items()
    ]
    headers = ["core", "steps/s", "charts/SPS at end", "vs tbptt"]
    if cleanrl:
        other_sps, other_script_sps = max(sps["cleanrl"])
        headers.append(f"vs CleanRL ({other_sps:.0f})")
        for row, (s, _) in zip(rows, best.values()):
            row.append(f"{s / other_sps:.2f}x")
    print_table(headers, rows)
    if cleanrl:
        runs = [round(s) for s, _ in sps["cleanrl"]]
        print(
            f"\nCleanRL: {cleanrl} at its defaults (PPO, LSTM 128, Breakout), best of {args.rounds} runs in the same "
            f"rounds: steady steps/s {other_sps:.0f}, its charts/SPS at end {other_script_sps:.0f}; runs: {runs}"
        )
    if reference and "rtrl" in best:
        median = {core: statistics.median(s for s, _ in sps[core]) for core in ("rtrl", "tbptt")}
        runs = ", ".join(f"{core} {[round(s) for s, _ in sps[core]]}" for core in args.cores)
        print(
            f"\nrtrl / tbptt steps/s: {best['rtrl'][0] / reference:.2f}x (best runs), "
            f"{median['rtrl'] / median['tbptt']:.2f}x (median runs); each core's runs, steps/s: {runs}"
        )

    splits = {core: iteration_split(script, core, args, device) for core in args.cores}
    print(
        f"\nseconds per iteration, in process (min over {args.split_repeats} replays; "
        f"env stepping etc. = {T * B} steps / steady steps/s - the parts)"
    )
    iteration = {core: T * B / best[core][0] for core in args.cores}
    sums = {
        core: {
            "update": sum(splits[core][p] for p in PARTS if p.startswith("update")),
            "all": sum(splits[core][p] for p in PARTS),
        }
        for core in args.cores
    }
    rows = [[part, *(f"{splits[core][part]:.4f}" for core in args.cores)] for part in PARTS]
    rows.append(["env stepping and the rest", *(f"{iteration[core] - sums[core]['all']:.4f}" for core in args.cores)])
    rows.append(["iteration (from steps/s)", *(f"{iteration[core]:.4f}" for core in args.cores)])
    rows.append(["update: sum of its parts", *(f"{sums[core]['update']:.4f}" for core in args.cores)])
    rows.append([CHECK, *(f"{splits[core][CHECK]:.4f}" for core in args.cores)])
    print_table(["part", *args.cores], rows)


if __name__ == "__main__":
    main(tyro.cli(Args))
