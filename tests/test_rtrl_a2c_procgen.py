"""rtrl_a2c_procgen.py's own claims: its levels, held-out evaluation, the script as a user runs it. The claims it
shares with the other scripts (the eLSTM, the update, checkpoints, long runs) are in tests/test_every_script.py."""

import ctypes.util
import glob
import os

import claims as checks
import helpers
import pytest
import torch

import rtrl_a2c_procgen as procgen

SCRIPT = procgen.__file__


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
    assert "test (all)" in proc.stdout and last in proc.stdout, proc.stdout  # each evaluation's line

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
        (["--env-id", "BigfishMemory-v0"], "did you mean HeistMemory-v0, BigfishHard-v0, BigfishEasy-v0?"),  # no memory mode
        (["--num-levels", "1100"], "test levels [1000, 1200) overlap the training levels [0, 1100)"),
        (["--num-levels", "0"], "overlap the training levels [0, inf)"),
        (["--start-level", "1300", "--num-levels", "50"], "test levels [1200, 1400) overlap"),
        (["--total-timesteps", "10", "--num-envs", "4", "--num-steps", "5"], "less than one rollout"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: procgen.check_args(procgen.parse_args(argv)[0]), flags, message, capsys)


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = run_script(tmp_path, "--init-stem-from", "missing.pt")
    checks.check_bad_input_is_a_one_line_error(proc, "--init-stem-from missing.pt: [Errno 2] No such file", tmp_path)


@pytest.mark.skipif(ctypes.util.find_library("Qt5Core") is not None, reason="a system Qt5 would serve")
def test_missing_qt_runtime_says_what_to_install(tmp_path):
    """A PyQt5 without its Qt libraries shadows the wheel: no Qt5 anywhere, as on a bare machine."""
    (tmp_path / "PyQt5").mkdir()
    (tmp_path / "PyQt5" / "__init__.py").write_text("")
    proc = run_script(tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    checks.check_bad_input_is_a_one_line_error(proc, "pip install PyQt5-Qt5", tmp_path)
