"""Helpers shared by the test files (each script is tested on its own; these hold no script code)."""

import contextlib
import glob
import os
import subprocess
import sys

import pytest
import torch


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_script(script, cwd, *flags, env=None):
    """The script as a user runs it, in `cwd` (with `env` if given); returns the CompletedProcess."""
    return subprocess.run([sys.executable, script, *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_population(script, cwd, *flags):
    """`--seed 4 --num-seeds 3 --run-name pop --save-model` with `flags`: the CompletedProcess, once it has exited 0
    and written the run directories pop__s4, pop__s5, pop__s6, each with a model.pt of its own seed."""
    proc = run_script(script, cwd, *flags, "--seed", "4", "--num-seeds", "3", "--run-name", "pop", "--save-model")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(cwd / "runs")) == ["pop__s4", "pop__s5", "pop__s6"]
    for seed in (4, 5, 6):
        assert torch.load(cwd / "runs" / f"pop__s{seed}" / "model.pt", weights_only=True)["args"]["seed"] == seed
    return proc


def quick_study(runner, tmp_path_factory):
    """A study runner's `--quick` as CI runs it, in a new directory: (that directory, the flags, the CompletedProcess);
    its report goes to report/, its runs to work/."""
    out = tmp_path_factory.mktemp("quick")
    flags = ("--quick", "--out-dir", str(out / "report"), "--work-dir", str(out / "work"))
    return out, flags, run_script(runner, out, *flags)


def episode_flags(steps, batch, g):
    """Flags as the scripts' env wrappers make them, env by env: episodes of random length whose last step returns
    terminated (half of them) or truncated; the next step takes the terminal observation (terminal_obs), the one
    after starts anew (first)."""
    terms, terminal_obs, firsts = (torch.zeros(steps, batch, dtype=torch.bool) for _ in range(3))
    for b in range(batch):
        start = 0
        while start < steps:
            firsts[start, b] = True
            last = start + int(torch.randint(0, 4, (1,), generator=g))
            if last + 1 < steps:
                terms[last, b] = bool(torch.rand(1, generator=g) < 0.5)
                terminal_obs[last + 1, b] = True
            start = last + 2
    return terms, terminal_obs, firsts


def child_pids(pid):
    """Live processes whose parent is `pid` (from /proc)."""
    children = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                children.append(int(stat.split("/")[2]))
    return children


def processes_under(path):
    """Pids of live processes whose working directory is `path` or inside it: what a run left behind."""
    path, found = os.path.realpath(path), []
    for cwd in glob.glob("/proc/[0-9]*/cwd"):
        with contextlib.suppress(OSError):
            cwd_path = os.path.realpath(os.readlink(cwd))
            if cwd_path == path or cwd_path.startswith(path.rstrip(os.sep) + os.sep):
                found.append(int(cwd.split("/")[2]))
    return found


def bad_input_in_process(parse, flags, message, capsys):
    """`parse(flags)` (a script's argument checks, run in-process: no interpreter start, no import) exits 2
    with one line naming the problem. Each script keeps one subprocess case showing its main runs these checks."""
    with pytest.raises(SystemExit) as exit_info:
        parse(list(flags))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def scalar_steps(run_dir):
    """{tag: [(step, value), ...]} over every event file of a run directory, as TensorBoard shows it (a resumed
    run's purge of the steps after its checkpoint applied), the files taken in the order they were written.
    TensorBoard takes them in name order: the creation second, then host and pid as strings; so a test's resume
    within the second its first run started (a pid of 4 digits after one of 5) would read the resume first."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    files.sort(key=lambda path: next(EventFileLoader(path).Load()).wall_time)  # its first event: the file's creation
    with tempfile.TemporaryDirectory() as ordered:
        for i, path in enumerate(files):
            os.symlink(os.path.abspath(path), os.path.join(ordered, f"events.out.tfevents.{i:06d}"))
        acc = EventAccumulator(ordered, size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same_tensors(a, b):
    """a == b bit for bit, through nested dicts, lists and tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tensors, a, b))
    return a == b
