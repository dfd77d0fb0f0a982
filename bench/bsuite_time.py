"""Where the time of rtrl_a2c_bsuite.py's steps goes, timed inside real runs of the script, one core after another:
bsuite's own Python stepping, the script's wrapper around it (`Envs.step`: stacking, tensors), acting (`Agent.act`),
the update's gradients (`compute_gradients`), the optimizer step, TensorBoard logging, and the rest of the loop
(returns, clipping, storage).

These are wrapped with timers; the run is the script's main, unchanged (the script's own functions are wrapped when
its main calls tyro.cli, once they exist). The span is from the first environment step to the last.

    python bench/bsuite_time.py            # memory_len/17 (L = 50), 2,000 episodes per core, 1 thread
"""

import contextlib
import io
import os
import runpy
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import bsuite.environments.base
import torch
import tyro
from common import ROOT, machine, print_table, set_threads
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    env_id: str = "memory_len/17"
    """the bsuite id of every run"""
    num_episodes: int = 2000
    """episodes per run"""
    cores: tuple[str, ...] = ("rtrl", "tbptt", "lstm", "ff")
    """--core of each run (at --num-steps 4)"""
    num_seeds: int = 1
    """--num-seeds of each run: K agents in one process (env steps: all K agents')"""
    threads: int = 1
    """torch threads (0: torch's default)"""


def timed(owner, name, totals, key):
    """owner.name wrapped: its wall time added to totals[key], the first and last call's times kept."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            end = time.perf_counter()
            totals[key] += end - start
            totals.setdefault("first", start)
            totals["last"] = end

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


PARTS = ("bsuite", "envs", "act", "gradients", "optimizer", "logging")


def run(core, args, num_episodes):
    totals = dict.fromkeys(PARTS, 0.0)
    undo = [
        timed(bsuite.environments.base.Environment, "step", totals, "bsuite"),
        timed(bsuite.environments.base.Environment, "reset", totals, "bsuite"),
        timed(SummaryWriter, "add_scalar", totals, "logging"),
        timed(torch.optim.RMSprop, "step", totals, "optimizer"),
    ]
    cli = tyro.cli

    def instrumented_cli(*a, **k):
        script = SimpleNamespace(**sys._getframe(1).f_globals)  # the script's main module, its functions defined
        undo.extend([timed(script.Envs, "step", totals, "envs"), timed(script.Agent, "act", totals, "act")])
        wrapped = SimpleNamespace(compute_gradients=script.compute_gradients)
        timed(wrapped, "compute_gradients", totals, "gradients")
        sys._getframe(1).f_globals["compute_gradients"] = wrapped.compute_gradients
        return cli(*a, **k)

    tyro.cli = instrumented_cli
    undo.append(lambda: setattr(tyro, "cli", cli))
    argv = [f"--env-id={args.env_id}", f"--num-episodes={num_episodes}", f"--core={core}", "--num-steps=4"]
    argv.append(f"--num-seeds={args.num_seeds}")
    cwd, old_argv = os.getcwd(), sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.chdir(tmp)
            sys.argv = ["rtrl_a2c_bsuite.py", *argv]
            with contextlib.redirect_stdout(io.StringIO()):  # the runs' own progress lines
                out = runpy.run_path(os.path.join(ROOT, "rtrl_a2c_bsuite.py"), run_name="__main__")
        finally:
            os.chdir(cwd)
            sys.argv = old_argv
            for u in undo:
                u()
    span, steps = totals["last"] - totals["first"], out["global_step"] * args.num_seeds
    parts = [totals["bsuite"], totals["envs"] - totals["bsuite"], *(totals[k] for k in PARTS[2:])]
    return [core, f"{steps:,}", f"{span:.1f}", f"{steps / span:,.0f}"] + [
        f"{100 * part / span:.0f}%" for part in (*parts, span - sum(parts))
    ]


if __name__ == "__main__":
    args = tyro.cli(Args)
    set_threads(args.threads)
    print(f"machine: {machine()}")
    run(args.cores[0], args, 16)  # warm-up: torch's first optimizer step and backward load code once per process
    rows = [run(core, args, args.num_episodes) for core in args.cores]
    print(
        f"rtrl_a2c_bsuite.py --env-id {args.env_id} --num-episodes {args.num_episodes} --num-steps 4 "
        f"--num-seeds {args.num_seeds}, defaults otherwise"
    )
    headers = ["core", "env steps", "seconds", "steps/s", "bsuite", "Envs.step", "act", "gradients", "RMSprop", "logging"]
    headers.append("rest")
    print_table(headers, rows)
