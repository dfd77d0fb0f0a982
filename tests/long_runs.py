"""Claims about long runs of the A2C scripts (Atari, ProcGen, MiniGrid): --checkpoint-every, --resume, Ctrl-C / SIGTERM.

Each check takes the script's module, as those of claims.py do. One short run as a user starts it (`first_run`) is
shared: the resumed runs, the second run of the same seed and the bad checkpoints start from it. Runs whose point is
not the interpreter start run the script's main block in-process (`run_in_process`), as `python SCRIPT FLAGS` would.
"""

import glob
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import claims as checks
import helpers
import numpy as np
import pytest
import torch


def run_in_process(script, cwd, flags, monkeypatch):
    """The script's main block in this process, in `cwd`, as `python SCRIPT FLAGS` runs it, without an interpreter
    start (its imports are loaded already). The signal handlers it installs are put back afterwards."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script.__file__, *flags])
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        runpy.run_path(script.__file__, run_name="__main__")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def the_run_dir(cwd):
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir


def first_run(script, tmp_path, flags, steps):
    """A run as a user starts it, with checkpoints; a copy of its last checkpoint (resuming overwrites the run's own)
    and its scalars as it left them."""
    proc = helpers.run_script(script.__file__, tmp_path, *flags, "--total-timesteps", str(steps))
    assert proc.returncode == 0, proc.stderr
    run_dir = the_run_dir(tmp_path)
    shutil.copy(os.path.join(run_dir, "checkpoint.pt"), tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert saved["script"] == os.path.basename(script.__file__) and saved["global_step"] == steps
    batch = saved["args"]["num_envs"] * saved["args"]["num_steps"]
    assert saved["iteration"] == steps // batch and saved["optimizer"]["state"]  # RMSprop's running averages
    return SimpleNamespace(
        dir=tmp_path,
        name=os.path.basename(run_dir),
        flags=flags,
        saved=saved,
        batch=batch,
        scalars=helpers.scalar_steps(run_dir),
    )


def check_resume_takes_the_checkpoints_args_and_the_flags_given(script, run, agent_shape, agent_flags=()):
    """`--resume PATH` alone gives the checkpoint's args, every one (the run's non-default flags among them); a flag
    given with it wins, in the args and in the optimizer; resume() loads the model and the optimizer's state bit for bit
    and reseeds python, numpy and torch from (seed, step), so that two resumes draw alike and unlike the run's start."""
    path = str(run.dir / "saved.pt")
    args, checkpoint = script.parse_args(["--resume", path])
    assert vars(args) == {**run.saved["args"], "resume": path}
    assert (args.num_envs, args.num_steps, args.hidden_size, args.checkpoint_every) == (2, 8, 16, 16)  # not the defaults
    flags = ["--total-timesteps", "999", "--learning-rate", "0.25", "--rms-eps", "0.5", "--resume", path]
    args, _ = script.parse_args(flags)
    assert vars(args) == {**run.saved["args"], "resume": path, "total_timesteps": 999, "learning_rate": 0.25, "rms_eps": 0.5}
    draws = []
    for _ in range(2):
        agent = script.Agent(*agent_shape, args.hidden_size, args.core, *agent_flags)
        optimizer = torch.optim.RMSprop(agent.parameters(), lr=1.0)
        torch.manual_seed(123)
        script.resume(checkpoint, agent, optimizer, args)
        draws.append((torch.rand(3), np.random.rand(), random.random()))
        assert helpers.same_tensors(agent.state_dict(), run.saved["model"])
        assert helpers.same_tensors(optimizer.state_dict()["state"], run.saved["optimizer"]["state"])
        assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["eps"]) == (0.25, 0.5)
    assert helpers.same_tensors(draws[0], draws[1])
    torch.manual_seed(run.saved["args"]["seed"])
    assert not torch.equal(draws[0][0], torch.rand(3))


def check_resumed_run_goes_on_from_its_step(script, run, total, more_flags, monkeypatch, capsys):
    """`--resume PATH --total-timesteps N` extends the run to N steps: the run directory's scalars are one run's, one
    per update with none twice, the learning rate goes on from the checkpoint's update, and every episode ending after
    the resume began after it (each environment started a new one). Returns the scalars."""
    saved_step, num_envs = run.saved["global_step"], run.saved["args"]["num_envs"]
    # as a global setting may have left it (set directly: pytest 9.2's monkeypatch cannot undo this attribute);
    # the script turns it off again, torch's default
    torch.backends.cuda.matmul.allow_tf32 = True
    resume = ("--resume", f"runs/{run.name}/checkpoint.pt", "--total-timesteps", str(total))
    run_in_process(script, run.dir, [*resume, *more_flags], monkeypatch)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the script asks for full float32 matmuls itself
    out = capsys.readouterr().out
    assert out.startswith("device: cpu (--cuda: no CUDA device found)\n") or torch.cuda.is_available(), out
    scalars = helpers.scalar_steps(run.dir / "runs" / run.name)
    for tag in checks.UPDATE_SCALARS:
        assert [step for step, _ in scalars[tag]] == list(range(run.batch, total + 1, run.batch)), tag
    assert all(v == v and abs(v) < float("inf") for _, v in scalars["losses/value_loss"])
    lr, lr0, iterations = dict(scalars["charts/learning_rate"]), run.saved["args"]["learning_rate"], total // run.batch
    saved_iteration = run.saved["iteration"]
    assert lr[saved_step] == pytest.approx(lr0 * (1 - (saved_iteration - 1) / saved_iteration))  # the first run's
    assert lr[saved_step + run.batch] == pytest.approx(lr0 * (1 - saved_iteration / iterations))  # goes on from there
    after = [(step, length) for step, length in scalars["charts/episodic_length"] if step > saved_step]
    assert after and all(0 < length <= (step - saved_step) / num_envs for step, length in after), after
    checkpoint = torch.load(run.dir / "runs" / run.name / "checkpoint.pt", weights_only=True)
    assert (checkpoint["global_step"], checkpoint["args"]["total_timesteps"]) == (total, total)
    return scalars, out


def check_same_seed_logs_identical_losses(script, run, tmp_path, monkeypatch):
    """The first run's flags again, in another process and directory: the same losses, float for float, and the
    same final weights bit for bit."""
    run_in_process(script, tmp_path, [*run.flags, "--total-timesteps", str(run.saved["global_step"])], monkeypatch)
    run_dir = the_run_dir(tmp_path)
    again = helpers.scalar_steps(run_dir)
    losses = [tag for tag in run.scalars if tag.startswith("losses/")]
    assert {f"losses/{name}" for name in ("policy_loss", "value_loss", "entropy", "grad_norm")} <= set(losses)
    assert all(len(run.scalars[tag]) == run.saved["iteration"] for tag in losses)
    assert all(run.scalars[tag] == again[tag] for tag in losses)
    model = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["model"]
    assert helpers.same_tensors(run.saved["model"], model)


def check_ctrl_c_writes_a_checkpoint_and_exits_130(script, run, tmp_path):
    """SIGINT after the first progress line: the update is finished, the checkpoint written (with no
    --checkpoint-every), and the exit code is 130."""
    # the last --checkpoint-every given wins
    flags = [*run.flags, "--checkpoint-every", "0", "--total-timesteps", "100000000"]
    proc = subprocess.Popen(
        [sys.executable, script.__file__, *flags], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("global_step="):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    run_dir = the_run_dir(tmp_path)
    path = os.path.relpath(os.path.join(run_dir, "checkpoint.pt"), tmp_path)
    checkpoint = torch.load(tmp_path / path, weights_only=True)
    assert f"stopped by SIGINT at global_step={checkpoint['global_step']}: --resume {path}" in out, out
    assert checkpoint["global_step"] == run.batch * checkpoint["iteration"] and checkpoint["iteration"] >= 1
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not os.path.exists(os.path.join(run_dir, "model.pt"))


def check_sigterm_finishes_the_update_and_exits_143(script, run, tmp_path, monkeypatch, capsys):
    """SIGTERM raised inside the first update's logging (in-process, so the moment is exact): that update is
    finished, its checkpoint written, and the script exits 143; no second update starts. Returns the run directory."""
    add_scalar, raised = script.SummaryWriter.add_scalar, []

    def add_scalar_then_sigterm(self, tag, *args, **kwargs):
        add_scalar(self, tag, *args, **kwargs)
        if tag == "charts/SPS" and not raised:
            raised.append(tag)
            # the default handler would end this test process
            assert callable(signal.getsignal(signal.SIGTERM)), "the script installed no SIGTERM handler"
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(script.SummaryWriter, "add_scalar", add_scalar_then_sigterm)
    flags = [*run.flags, "--total-timesteps", str(3 * run.batch)]
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(script, tmp_path, flags, monkeypatch)
    monkeypatch.undo()
    assert raised and exit_info.value.code == 143
    run_dir = the_run_dir(tmp_path)
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (checkpoint["iteration"], checkpoint["global_step"]) == (1, run.batch)
    path = os.path.relpath(os.path.join(run_dir, "checkpoint.pt"), tmp_path)
    assert f"stopped by SIGTERM at global_step={run.batch}: --resume {path}" in capsys.readouterr().out
    return run_dir


def check_resume_alone_finishes_the_run_deterministically(script, run_dir, batch, monkeypatch):
    """The stopped run, resumed twice from the same checkpoint by `--resume PATH` and nothing else (in two copies of its
    directory): each finishes the run's 3 updates with its flags, and the two log the same losses float for float and
    end with the same weights bit for bit."""
    name, results = os.path.basename(run_dir), []
    for copy in ("a", "b"):
        cwd = os.path.join(os.path.dirname(os.path.dirname(run_dir)), f"resumed_{copy}")
        shutil.copytree(run_dir, os.path.join(cwd, "runs", name))
        run_in_process(script, cwd, ["--resume", f"runs/{name}/checkpoint.pt"], monkeypatch)
        scalars = helpers.scalar_steps(os.path.join(cwd, "runs", name))
        checkpoint = torch.load(os.path.join(cwd, "runs", name, "checkpoint.pt"), weights_only=True)
        assert [step for step, _ in scalars["losses/value_loss"]] == [batch, 2 * batch, 3 * batch]
        assert (checkpoint["iteration"], checkpoint["global_step"], checkpoint["args"]["num_envs"]) == (3, 3 * batch, 2)
        results.append(({tag: v for tag, v in scalars.items() if tag.startswith("losses/")}, checkpoint["model"]))
    assert results[0][0] == results[1][0] and helpers.same_tensors(results[0][1], results[1][1])


def check_bad_checkpoints_are_one_line_errors(script, run, tmp_path, capsys, obs_shape, num_actions, cases):
    """Each case (change, flags, message): the checkpoint changed so (or as saved), resumed with `flags`, exits 2 with
    one line. Restoring is part of it: a model that does not fit is refused with load_state_dict's own message."""

    def resume(argv):
        args, checkpoint = script.parse_args(argv)
        frozen = {"freeze_stem": args.freeze_stem} if hasattr(args, "freeze_stem") else {}  # MiniGrid's has no flag
        agent = script.Agent(obs_shape, num_actions, args.hidden_size, args.core, **frozen)
        script.resume(checkpoint, agent, torch.optim.RMSprop([p for p in agent.parameters() if p.requires_grad]), args)

    for change, flags, message in cases:
        path = tmp_path / "ck.pt"
        if change == "truncate":
            path.write_bytes((run.dir / "saved.pt").read_bytes()[:2000])
        else:
            other = script.Agent(obs_shape, num_actions, 8).state_dict()  # the first run's hidden size is 16
            edited = {
                "weights only": {"script": run.saved["script"], "model": run.saved["model"], "args": run.saved["args"]},
                "another script's args": {**run.saved, "args": {**run.saved["args"], "not_a_flag_here": 1}},
                "other shapes": {**run.saved, "model": other},
            }
            torch.save(edited.get(change, run.saved), path)
        helpers.bad_input_in_process(resume, ["--resume", str(path), *flags], message, capsys)


def check_main_checks_the_checkpoint_before_it_writes(script, run):
    """As a user runs it: a checkpoint that does not fit the flags given (a hidden size of 64 for its 16) is refused
    with load_state_dict's message on one line, and the run directory is left as it was."""
    run_dir = run.dir / "runs" / run.name
    before = {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)}
    proc = helpers.run_script(script.__file__, run.dir, "--resume", f"runs/{run.name}/checkpoint.pt", "--hidden-size", "64")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "size mismatch for cell." in proc.stderr and "torch.Size([64" in proc.stderr, proc.stderr
    assert {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)} == before


def check_a_checkpoint_gives_its_stem(script, run, obs_shape, num_actions):
    """checkpoint.pt names its script and holds the model: --init-stem-from takes it as it takes a model.pt."""
    agent = script.Agent(obs_shape, num_actions, 8, "tbptt")
    script.load_stem(agent, str(run.dir / "saved.pt"))
    for name, tensor in agent.stem.state_dict().items():
        assert torch.equal(tensor, run.saved["model"][f"stem.{name}"]), name


# ---------------------------------------------------------------------------------------------
# Ready for a GPU: the device line, checkpoints on the CPU
# ---------------------------------------------------------------------------------------------
def check_the_device_line_names_the_device(script, monkeypatch):
    """pick_device's line for each case: the GPU's name and torch's CUDA version, or why there is no GPU."""
    assert script.pick_device(script.Args(cuda=False)) == (torch.device("cpu"), "device: cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.pick_device(script.Args()) == (torch.device("cpu"), "device: cpu (--cuda: no CUDA device found)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU on {device}")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert script.pick_device(script.Args()) == (
        torch.device("cuda:0"),
        "device: cuda:0 (Fake GPU on cuda:0, torch CUDA 12.4)",
    )
    assert script.pick_device(script.Args(cuda=False)) == (torch.device("cpu"), "device: cpu")


class OnFakeGPU(torch.Tensor):
    """A tensor as if on a GPU: only .cpu() makes it a plain tensor, and torch.load(weights_only=True) refuses it."""

    def cpu(self):
        return self.as_subclass(torch.Tensor)


def check_a_checkpoint_from_a_gpu_loads_on_the_cpu(script, obs_shape, num_actions, tmp_path, monkeypatch):
    """save_checkpoint moves the model's and the optimizer's tensors to the CPU: the file loads on a machine with
    no GPU, by torch.load without map_location, into a fresh agent and optimizer."""
    torch.manual_seed(0)
    agent = script.Agent(obs_shape, num_actions, 8, "rtrl")
    optimizer = torch.optim.RMSprop(agent.parameters())
    for p in agent.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # RMSprop's running averages, tensors in the optimizer state

    def fake(tree):
        return {
            k: fake(v) if isinstance(v, dict) else v.as_subclass(OnFakeGPU) if isinstance(v, torch.Tensor) else v
            for k, v in tree.items()
        }

    model, state = fake(agent.state_dict()), optimizer.state_dict()
    state = {**state, "state": {k: fake(v) for k, v in state["state"].items()}}
    assert all(type(v) is OnFakeGPU for v in model.values())
    monkeypatch.setattr(agent, "state_dict", lambda: model)
    path = str(tmp_path / "checkpoint.pt")
    script.save_checkpoint(agent, script.Args(), path, optimizer=state)
    loaded = torch.load(path, weights_only=True)
    tensors = [*loaded["model"].values(), *(t for s in loaded["optimizer"]["state"].values() for t in s.values())]
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
    fresh = script.Agent(obs_shape, num_actions, 8, "rtrl")
    fresh.load_state_dict(loaded["model"])
    torch.optim.RMSprop(fresh.parameters()).load_state_dict(loaded["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.values()))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_two_updates_on_cuda(script, tmp_path, flags):
    """Two updates on cuda:0, as a user runs the script: the device line names the GPU, and model.pt loads on the
    CPU without map_location."""
    proc = helpers.run_script(script.__file__, tmp_path, *flags, "--save-model")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("device: cuda:0 (") and ", torch CUDA " in proc.stdout.splitlines()[0], proc.stdout
    checks.check_update_scalars(checks.read_scalars(the_run_dir(tmp_path)), iterations=2)
    model = torch.load(os.path.join(the_run_dir(tmp_path), "model.pt"), weights_only=True)
    assert all(t.device.type == "cpu" for t in model["model"].values())
