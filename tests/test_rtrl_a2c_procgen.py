"""Claims about rtrl_a2c_procgen.py: the shared A2C claims (tests/claims.py) and held-out evaluation."""

import ctypes.util
import glob
import os

import claims as checks
import helpers
import long_runs
import pytest
import torch
import tyro

import rtrl_a2c_procgen as procgen

SCRIPT = procgen.__file__


def test_returns_bootstrap_truncations_and_cut_terminations():
    checks.check_returns_bootstrap_truncations_and_cut_terminations(procgen)


@pytest.mark.parametrize(
    "core,impl", [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked"), ("ff", "chunked")]
)
def test_update_gradients_equal_autograd_on_equivalent_computation(core, impl):
    checks.check_update_gradients_equal_autograd(procgen, core, impl)


@pytest.mark.parametrize("core,impl", [("rtrl", "chunked"), ("tbptt", "chunked"), ("lstm", "chunked")])
def test_frozen_stem_gets_no_gradient_nor_backward_pass_and_the_rest_equals_autograd(core, impl):
    checks.check_frozen_stem_gets_nothing_and_the_rest_is_exact(procgen, core, impl)


def test_init_stem_from_copies_the_stem_and_refuses_what_does_not_fit(tmp_path, capsys):
    checks.check_init_stem_from(procgen, tmp_path, capsys, (3, 64, 64), (4, 84, 84))


@pytest.mark.parametrize("core", ["rtrl", "lstm"])
def test_stem_in_update_on_and_off_give_the_same_gradients(core):
    long_runs.check_stem_in_update_gives_the_same_gradients(procgen, core)


def test_the_device_line_names_the_device(monkeypatch):
    long_runs.check_the_device_line_names_the_device(procgen, monkeypatch)


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    long_runs.check_a_checkpoint_from_a_gpu_loads_on_the_cpu(procgen, (3, 64, 64), 15, tmp_path, monkeypatch)


def test_greedy_evaluation_plays_a_fixed_quota_per_env():
    checks.check_greedy_evaluation_plays_a_fixed_quota_per_env(procgen)


# ---------------------------------------------------------------------------------------------
# Levels
# ---------------------------------------------------------------------------------------------
def test_defaults_make_the_papers_chaser_hard_on_500_training_levels():
    args = procgen.Args()
    envs = procgen.ProcgenEnvs(args.env_id, [1], args.start_level, args.num_levels, torch.device("cpu"))
    config = envs.envs.spec.config
    envs.close()
    assert (config.env_name, config.distribution_mode) == ("chaser", 1)  # EnvPool's 1 = procgen's "hard"
    assert (config.start_level, config.num_levels, args.num_steps) == (0, 500, 50)


def test_eval_uses_only_held_out_levels(tmp_path):
    """EnvPool's info["level_seed"] of every evaluation episode lies in its own level set."""
    args = procgen.Args(
        env_id="ChaserEasy-v0", start_level=10, num_levels=5, test_level_starts=(20, 40), test_num_levels=3, eval_episodes=6
    )
    torch.manual_seed(0)
    agent = procgen.Agent((3, 64, 64), 15, 8)
    writer = procgen.SummaryWriter(str(tmp_path))
    results = procgen.evaluate_level_sets(agent, args, procgen.env_seeds(0, 3), torch.device("cpu"), writer, 0)
    writer.close()

    assert sorted(results) == ["test 20", "test 40", "train"]
    train = range(args.start_level, args.start_level + args.num_levels)
    for name, (start, num) in procgen.level_sets(args).items():
        seeds = [level_seed for _, level_seed in results[name]]
        assert len(seeds) == args.eval_episodes
        assert all(start <= s < start + num for s in seeds), (name, seeds)
        if name != "train":
            assert not any(s in train for s in seeds), (name, seeds)
    assert len({s for name in results for _, s in results[name]}) > 3  # levels really vary within a set
    scalars = checks.read_scalars(str(tmp_path))
    assert set(scalars) == {"eval/train_levels_return", "eval/test_levels_return"}


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
def run_script(tmp_path, *flags, env=None):
    return helpers.run_script(SCRIPT, tmp_path, *flags, env=env)


# on the default game, ChaserHard-v0, where episodes end within ~100 steps in training and in greedy evaluation
# (greedy MazeMemory ones last their 500-step limit): the fully online lstm on a pretrained, frozen stem (rtrl at
# T=8: the resumed run below; ff: the Atari smoke runs, the gradient test)
@pytest.mark.parametrize("core,num_steps,updates,test_sets", [("lstm", 1, 16, ["3000"])])
def test_training_run_writes_both_eval_scalars_and_a_loadable_checkpoint(tmp_path, core, num_steps, updates, test_sets):
    steps = 2 * num_steps * updates
    frozen = core == "lstm"
    torch.manual_seed(0)
    pretrained = procgen.Agent((3, 64, 64), 15, 8, "tbptt")
    procgen.save_checkpoint(pretrained, procgen.Args(core="tbptt"), str(tmp_path / "pretrained.pt"))
    stem_flags = ["--init-stem-from", "pretrained.pt", "--freeze-stem"] if frozen else []
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
        "2",
        "--eval-every",
        str(steps // 2),
        "--test-level-starts",
        *test_sets,
        "--save-model",
        "--stem-in-update",
        "on",
        *stem_flags,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("device: cpu (--cuda: no CUDA device found)\n") or torch.cuda.is_available()
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"ChaserHard-v0__rtrl_a2c_procgen__{core}__T{num_steps}__1__*"))
    scalars = checks.read_scalars(run_dir)
    checks.check_update_scalars(scalars, iterations=updates)
    for tag in ("eval/train_levels_return", "eval/test_levels_return"):
        assert len(scalars[tag]) == 2, tag  # halfway and at the end
    last = f"[{test_sets[-1]}, {int(test_sets[-1]) + 200})"
    assert "test (all)" in proc.stdout and last in proc.stdout, proc.stdout  # the final table

    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert checkpoint["args"]["core"] == core and not glob.glob(os.path.join(run_dir, "*.tmp"))
    agent = procgen.Agent((3, 64, 64), 15, checkpoint["args"]["hidden_size"], core)
    agent.load_state_dict(checkpoint["model"])
    assert checkpoint["script"] == "rtrl_a2c_procgen.py" and checkpoint["args"]["freeze_stem"] == frozen
    trained_stem = agent.stem.state_dict()
    stem_kept = [torch.equal(trained_stem[k], v) for k, v in pretrained.stem.state_dict().items()]
    assert all(stem_kept) if frozen else not any(stem_kept)  # loaded and left alone, or trained from its own start


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--env-id", "MazeMemry-v0"], "did you mean MazeMemory-v0"),
        (["--env-id", "BigfishMemory-v0"], "valid ids: BigfishEasy-v0, BigfishHard-v0"),  # no memory mode
        (["--num-levels", "-1"], "--num-levels must be at least 0"),
        (["--num-levels", "1100"], "overlap the training levels [0, 1100)"),
        (["--num-levels", "0"], "overlap the training levels [0, inf)"),
        (["--start-level", "1300", "--num-levels", "50"], "test levels [1200, 1400) overlap"),
        (["--test-level-starts", "-5"], "outside ProcGen's"),
        (["--start-level", "2147483000", "--num-levels", "1000"], "training levels [2147483000, 2147484000) are outside"),
        (["--num-envs", "0"], "--num-envs must be at least 1"),
        (["--total-timesteps", "10", "--num-envs", "4", "--num-steps", "5"], "less than one rollout"),
        (["--gamma", "1.5"], "--gamma must be in"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be at least 0"),
        (["--init-stem-from", "missing.pt"], "--init-stem-from missing.pt: no such file"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: procgen.check_args(tyro.cli(procgen.Args, args=argv)), flags, message, capsys)


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = run_script(tmp_path, "--init-stem-from", "missing.pt")
    checks.check_bad_input_is_a_one_line_error(proc, "--init-stem-from missing.pt: no such file", tmp_path)


# ---------------------------------------------------------------------------------------------
# Long runs: --checkpoint-every, --resume, Ctrl-C / SIGTERM (tests/long_runs.py)
# ---------------------------------------------------------------------------------------------
RESUMABLE = (
    "--num-envs",
    "2",
    "--num-steps",
    "8",
    "--hidden-size",
    "16",
    "--eval-episodes",
    "0",
    "--checkpoint-every",
    "16",
    "--eval-every",
    "160",
)
SAVED_STEP = 48  # 3 updates of 2 envs x 8 steps; checkpoints at 16, 32, 48 (the end)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    return long_runs.first_run(procgen, tmp_path_factory.mktemp("checkpointed"), RESUMABLE, SAVED_STEP)


def test_resume_restores_every_tensor_bit_for_bit_and_the_run_goes_on_from_its_step(checkpointed, monkeypatch, capsys):
    long_runs.check_resume_restores_every_tensor_bit_for_bit(procgen, checkpointed, monkeypatch, capsys)
    # to 320 steps (136 per env after the resume: Chaser's episodes end), with the smoke run's evaluations (160 steps
    # after the resume, and at the end) on the default test sets, and model.pt
    more = ["--eval-episodes", "1", "--save-model"]
    scalars = long_runs.check_resumed_run_goes_on_from_its_step(procgen, checkpointed, 320, more, monkeypatch)
    for tag in ("eval/train_levels_return", "eval/test_levels_return"):
        assert [step for step, _ in scalars[tag]] == [208, 320], tag
    out = capsys.readouterr().out
    assert "test (all)" in out and "[1400, 1600)" in out, out  # the final table
    model = torch.load(checkpointed.dir / "runs" / checkpointed.name / "model.pt", weights_only=True)
    agent = procgen.Agent((3, 64, 64), 15, 16, "rtrl")
    agent.load_state_dict(model["model"])
    assert model["script"] == "rtrl_a2c_procgen.py" and model.keys() == {"script", "model", "args"}


def test_the_same_seed_logs_identical_losses(checkpointed, tmp_path, monkeypatch):
    long_runs.check_same_seed_logs_identical_losses(procgen, checkpointed, tmp_path, monkeypatch)


def test_ctrl_c_finishes_the_update_writes_a_checkpoint_and_exits_130(checkpointed, tmp_path):
    long_runs.check_ctrl_c_writes_a_checkpoint_and_exits_130(procgen, checkpointed, tmp_path)


def test_sigterm_finishes_the_update_writes_a_checkpoint_and_exits_143(checkpointed, tmp_path, monkeypatch, capsys):
    long_runs.check_sigterm_finishes_the_update_and_exits_143(procgen, checkpointed, tmp_path, monkeypatch, capsys)


def test_a_bad_checkpoint_to_resume_is_a_one_line_error(checkpointed, tmp_path, capsys):
    cases = [
        (None, ["--resume", "missing.pt"], "--resume: no such file 'missing.pt'"),
        ("truncate", [], "is not a readable checkpoint"),
        ("weights only", [], "is not a checkpoint to resume from (no global_step, iteration, optimizer"),
        ("other script", [], "was written by rtrl_a2c_minigrid.py, not rtrl_a2c_procgen.py"),
        (
            None,
            ["--hidden-size", "64", "--core", "tbptt"],
            "differs from the checkpoint's run: --hidden-size 64 (checkpoint: 16), --core tbptt (checkpoint: rtrl)",
        ),
        (None, ["--env-id", "MazeMemory-v0"], "--env-id MazeMemory-v0 (checkpoint: ChaserHard-v0)"),
        (None, ["--test-level-starts", "2000"], "--test-level-starts (2000,) (checkpoint: (1000, 1200, 1400))"),
        (None, ["--total-timesteps", "40"], "--total-timesteps 40 is below the checkpoint's step 48"),
        ("other shapes", [], "--resume: the checkpoint does not fit this agent (Error(s) in loading state_dict"),
    ]
    long_runs.check_bad_checkpoints_are_one_line_errors(procgen, checkpointed, tmp_path, capsys, (3, 64, 64), 15, cases)


def test_a_checkpoint_serves_as_init_stem_from(checkpointed):
    long_runs.check_a_checkpoint_gives_its_stem(procgen, checkpointed, (3, 64, 64), 15)


def test_the_script_checks_the_checkpoint_before_it_writes(checkpointed):
    long_runs.check_main_checks_the_checkpoint_before_it_writes(procgen, checkpointed)


@pytest.mark.skipif(ctypes.util.find_library("Qt5Core") is not None, reason="a system Qt5 would serve")
def test_missing_qt_runtime_says_what_to_install(tmp_path):
    """A PyQt5 without its Qt libraries shadows the wheel: no Qt5 anywhere, as on a bare machine."""
    (tmp_path / "PyQt5").mkdir()
    (tmp_path / "PyQt5" / "__init__.py").write_text("")
    proc = run_script(tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    checks.check_bad_input_is_a_one_line_error(proc, "pip install PyQt5-Qt5", tmp_path)


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped without one): the float64 RTRL = BPTT claim and two updates on cuda
# ---------------------------------------------------------------------------------------------
@long_runs.CUDA
def test_two_updates_on_cuda(tmp_path):
    flags = (
        "--num-envs",
        "2",
        "--num-steps",
        "8",
        "--total-timesteps",
        "32",
        "--hidden-size",
        "16",
        "--eval-episodes",
        "1",
        "--test-level-starts",
        "3000",
    )
    long_runs.check_two_updates_on_cuda(procgen, tmp_path, flags)
