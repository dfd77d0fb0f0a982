"""Claims about rtrl_a2c_atari.py, each checked against an independent float64 computation (tests/claims.py)."""

import glob
import os

import claims as checks
import helpers
import long_runs
import pytest
import torch
import tyro

import rtrl_a2c_atari as atari

SCRIPT = atari.__file__


def test_returns_bootstrap_truncations_and_cut_terminations():
    checks.check_returns_bootstrap_truncations_and_cut_terminations(atari)


@pytest.mark.parametrize(
    "core,impl", [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked"), ("ff", "chunked")]
)
def test_update_gradients_equal_autograd_on_equivalent_computation(core, impl):
    checks.check_update_gradients_equal_autograd(atari, core, impl)


FROZEN_CORES = [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked")]


@pytest.mark.parametrize("core,impl", FROZEN_CORES)
def test_frozen_stem_gets_no_gradient_nor_backward_pass_and_the_rest_equals_autograd(core, impl):
    checks.check_frozen_stem_gets_nothing_and_the_rest_is_exact(atari, core, impl)


def test_init_stem_from_copies_the_stem_and_refuses_what_does_not_fit(tmp_path, capsys):
    checks.check_init_stem_from(atari, tmp_path, capsys, (4, 84, 84), (3, 64, 64))


@pytest.mark.parametrize("core", ["rtrl", "lstm"])
def test_stem_in_update_on_and_off_give_the_same_gradients(core):
    long_runs.check_stem_in_update_gives_the_same_gradients(atari, core)


def test_the_device_line_names_the_device(monkeypatch):
    long_runs.check_the_device_line_names_the_device(atari, monkeypatch)


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    long_runs.check_a_checkpoint_from_a_gpu_loads_on_the_cpu(atari, (4, 84, 84), 4, tmp_path, monkeypatch)


def test_greedy_evaluation_plays_a_fixed_quota_per_env():
    checks.check_greedy_evaluation_plays_a_fixed_quota_per_env(atari)


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
def run_script(tmp_path, *flags):
    return helpers.run_script(SCRIPT, tmp_path, *flags)


# rtrl at T=8 runs long enough for games to end in the resumed run below. tbptt runs the update code ff runs (the
# eLSTM by autograd, another reset mask): lstm takes its smoke run; the fully online run also loads a pretrained
# stem and freezes it. These show that each core's loop runs and writes what it should.
@pytest.mark.parametrize("core,num_steps,updates,frozen", [("lstm", 8, 3, False), ("ff", 8, 3, False), ("rtrl", 1, 8, True)])
def test_training_run_writes_scalars_and_a_loadable_checkpoint(tmp_path, core, num_steps, updates, frozen):
    steps = 2 * num_steps * updates
    torch.manual_seed(0)
    pretrained = atari.Agent((4, 84, 84), 4, 8, "tbptt")
    atari.save_checkpoint(pretrained, atari.Args(core="tbptt"), str(tmp_path / "pretrained.pt"))
    stem_flags = ["--init-stem-from", "pretrained.pt", "--freeze-stem"] if frozen else []
    if core == "ff":  # the stem recomputed in the update (the CUDA default; the CPU's keeps the rollout's graphs)
        stem_flags = ["--stem-in-update", "on"]
    proc = run_script(
        tmp_path,
        "--core",
        core,
        "--num-envs",
        "2",
        "--num-steps",
        str(num_steps),
        "--total-timesteps",
        str(steps),
        "--hidden-size",
        "16",
        "--eval-episodes",
        "1",
        "--save-model",
        *stem_flags,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("device: cpu (--cuda: no CUDA device found)\n") or torch.cuda.is_available()
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"Breakout-v5__rtrl_a2c_atari__{core}__T{num_steps}__1__*"))
    scalars = checks.read_scalars(run_dir)
    checks.check_update_scalars(scalars, iterations=updates)
    assert len(scalars["eval/episodic_return"]) == 1

    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert checkpoint["args"]["core"] == core and not glob.glob(os.path.join(run_dir, "*.tmp"))
    agent = atari.Agent((4, 84, 84), 4, checkpoint["args"]["hidden_size"], core)
    agent.load_state_dict(checkpoint["model"])
    assert checkpoint["script"] == "rtrl_a2c_atari.py" and checkpoint["args"]["freeze_stem"] == frozen
    trained_stem = agent.stem.state_dict()
    stem_kept = [torch.equal(trained_stem[k], v) for k, v in pretrained.stem.state_dict().items()]
    assert all(stem_kept) if frozen else not any(stem_kept)  # loaded and left alone, or trained from its own start


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--env-id", "Breakot-v5"], "Breakout-v5"),
        (["--num-envs", "0"], "--num-envs must be at least 1"),
        (["--num-steps", "0"], "--num-steps must be at least 1"),
        (["--total-timesteps", "10", "--num-envs", "4", "--num-steps", "5"], "less than one rollout"),
        (["--learning-rate", "-1"], "--learning-rate must be in"),
        (["--gamma", "1.5"], "--gamma must be in"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be positive"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be at least 0"),
        (["--init-stem-from", "missing.pt"], "--init-stem-from missing.pt: no such file"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: atari.check_args(tyro.cli(atari.Args, args=argv)), flags, message, capsys)


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = run_script(tmp_path, "--init-stem-from", "missing.pt")
    checks.check_bad_input_is_a_one_line_error(proc, "--init-stem-from missing.pt: no such file", tmp_path)


# ---------------------------------------------------------------------------------------------
# Long runs: --checkpoint-every, --resume, Ctrl-C / SIGTERM (tests/long_runs.py)
# ---------------------------------------------------------------------------------------------
RESUMABLE = ("--num-envs", "2", "--num-steps", "8", "--hidden-size", "16", "--eval-episodes", "0", "--checkpoint-every", "16")
SAVED_STEP = 48  # 3 updates of 2 envs x 8 steps; checkpoints at 16, 32, 48 (the end)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    return long_runs.first_run(atari, tmp_path_factory.mktemp("checkpointed"), RESUMABLE, SAVED_STEP)


def test_resume_restores_every_tensor_bit_for_bit_and_the_run_goes_on_from_its_step(checkpointed, monkeypatch, capsys):
    long_runs.check_resume_restores_every_tensor_bit_for_bit(atari, checkpointed, monkeypatch, capsys)
    # to 640 steps (320 per env: games end), with the smoke run's evaluation and model.pt
    more = ["--eval-episodes", "1", "--save-model"]
    scalars = long_runs.check_resumed_run_goes_on_from_its_step(atari, checkpointed, 640, more, monkeypatch)
    assert len(scalars["eval/episodic_return"]) == 1
    model = torch.load(checkpointed.dir / "runs" / checkpointed.name / "model.pt", weights_only=True)
    agent = atari.Agent((4, 84, 84), 4, 16, "rtrl")
    agent.load_state_dict(model["model"])
    assert model["script"] == "rtrl_a2c_atari.py" and model.keys() == {"script", "model", "args"}


def test_the_same_seed_logs_identical_losses(checkpointed, tmp_path, monkeypatch):
    long_runs.check_same_seed_logs_identical_losses(atari, checkpointed, tmp_path, monkeypatch)


def test_ctrl_c_finishes_the_update_writes_a_checkpoint_and_exits_130(checkpointed, tmp_path):
    long_runs.check_ctrl_c_writes_a_checkpoint_and_exits_130(atari, checkpointed, tmp_path)


def test_sigterm_finishes_the_update_writes_a_checkpoint_and_exits_143(checkpointed, tmp_path, monkeypatch, capsys):
    long_runs.check_sigterm_finishes_the_update_and_exits_143(atari, checkpointed, tmp_path, monkeypatch, capsys)


def test_a_bad_checkpoint_to_resume_is_a_one_line_error(checkpointed, tmp_path, capsys):
    cases = [
        (None, ["--resume", "missing.pt"], "--resume: no such file 'missing.pt'"),
        ("truncate", [], "is not a readable checkpoint"),
        ("weights only", [], "is not a checkpoint to resume from (no global_step, iteration, optimizer"),
        ("other script", [], "was written by rtrl_a2c_minigrid.py, not rtrl_a2c_atari.py"),
        (
            None,
            ["--hidden-size", "64", "--core", "tbptt"],
            "differs from the checkpoint's run: --hidden-size 64 (checkpoint: 16), --core tbptt (checkpoint: rtrl)",
        ),
        (None, ["--env-id", "Pong-v5"], "--env-id Pong-v5 (checkpoint: Breakout-v5)"),
        (None, ["--total-timesteps", "40"], "--total-timesteps 40 is below the checkpoint's step 48"),
        ("other shapes", [], "--resume: the checkpoint does not fit this agent (Error(s) in loading state_dict"),
    ]
    long_runs.check_bad_checkpoints_are_one_line_errors(atari, checkpointed, tmp_path, capsys, (4, 84, 84), 4, cases)


def test_a_checkpoint_serves_as_init_stem_from(checkpointed):
    long_runs.check_a_checkpoint_gives_its_stem(atari, checkpointed, (4, 84, 84), 4)


def test_the_script_checks_the_checkpoint_before_it_writes(checkpointed):
    long_runs.check_main_checks_the_checkpoint_before_it_writes(atari, checkpointed)


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped without one): the float64 RTRL = BPTT claim and two updates on cuda
# ---------------------------------------------------------------------------------------------
@long_runs.CUDA
def test_two_updates_on_cuda(tmp_path):
    flags = ("--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--hidden-size", "16", "--eval-episodes", "1")
    long_runs.check_two_updates_on_cuda(atari, tmp_path, flags)
