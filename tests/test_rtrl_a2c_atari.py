"""rtrl_a2c_atari.py as a user runs it: its training runs and its bad input. The claims it shares with the other scripts
(the eLSTM, the update, checkpoints, long runs) are in tests/test_every_script.py."""

import glob
import os

import claims as checks
import helpers
import pytest
import torch

import rtrl_a2c_atari as atari

SCRIPT = atari.__file__


# ---------------------------------------------------------------------------------------------
# The environments
# ---------------------------------------------------------------------------------------------
def test_envs_have_the_papers_preprocessing():
    """Method §5: 84x84 gray, frame skip 4, a 4-frame stack, noop reset <= 30, fire reset, episodic life, no sticky
    actions, rewards unclipped (the loss clips them); EnvPool's defaults but for episodic life, pinned here."""
    envs = atari.AtariEnvs("Breakout-v5", [1], torch.device("cpu"))
    config = envs.envs.spec.config
    envs.close()
    assert (config.img_height, config.img_width, config.gray_scale, config.frame_skip, config.stack_num) == (84, 84, 1, 4, 4)
    assert (config.noop_max, config.use_fire_reset, config.episodic_life) == (30, 1, 1)
    assert (config.repeat_action_probability, config.reward_clip) == (0, 0)
    assert envs.obs.shape == (1, 4, 84, 84) and envs.obs.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
def run_script(tmp_path, *flags):
    return helpers.run_script(SCRIPT, tmp_path, *flags)


# rtrl at T=8 runs in the long-run claims (tests/test_every_script.py). tbptt runs the update code ff runs (the eLSTM
# by autograd, another reset mask): lstm takes its smoke run; the fully online run also loads a pretrained stem and
# freezes it. These show that each core's loop runs and writes what it should.
@pytest.mark.parametrize("core,num_steps,updates,frozen", [("lstm", 8, 3, False), ("ff", 8, 3, False), ("rtrl", 1, 8, True)])
def test_training_run_writes_scalars_and_a_loadable_checkpoint(tmp_path, core, num_steps, updates, frozen):
    steps = 2 * num_steps * updates
    torch.manual_seed(0)
    pretrained = atari.Agent((4, 84, 84), 4, 8, "tbptt")
    atari.save_checkpoint(pretrained, atari.Args(core="tbptt"), str(tmp_path / "pretrained.pt"))
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
        (["--env-id", "Breakot-v5"], "unknown Atari env id 'Breakot-v5'; did you mean Breakout-v5"),
        (["--total-timesteps", "10", "--num-envs", "4", "--num-steps", "5"], "less than one rollout (4 envs x 5)"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: atari.check_args(atari.parse_args(argv)[0]), flags, message, capsys)


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    """A stem file that is not there is refused with torch.load's words, before anything is written."""
    proc = run_script(tmp_path, "--init-stem-from", "missing.pt")
    checks.check_bad_input_is_a_one_line_error(proc, "--init-stem-from missing.pt: [Errno 2] No such file", tmp_path)
