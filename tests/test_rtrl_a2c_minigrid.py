"""rtrl_a2c_minigrid.py's own claims: EnvPool MiniGrid's episode semantics and the script as a user runs it. The claims
it shares with the other scripts (the eLSTM, the update, checkpoints, long runs) are in tests/test_every_script.py."""

import glob
import os

import claims as checks
import envpool
import helpers
import numpy as np
import pytest
import torch

import rtrl_a2c_minigrid as minigrid

SCRIPT = minigrid.__file__
ENV_ID = "MiniGrid-MemoryS7-v0"


# ---------------------------------------------------------------------------------------------
# EnvPool MiniGrid's episode ends, and the flags the wrapper makes of them
# ---------------------------------------------------------------------------------------------
def test_envpool_minigrid_answers_the_step_after_an_episode_end_with_a_new_episode_ignoring_its_action():
    """Two copies of one seeded env act alike until an episode ends, then differently for one step: the
    observation after that step is the same in both (the action was ignored) and starts a new episode."""
    envs = envpool.make(ENV_ID, env_type="gymnasium", num_envs=2, env_seed=[5, 5])
    envs.reset()
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a = rng.integers(0, 3)
        obs, reward, term, trunc, info = envs.step(np.array([a, a]))
        if term[0] or trunc[0]:
            break
    assert term[0] and term[1], "random play ends an S7 episode well within 2000 steps"
    obs, reward, term, trunc, info = envs.step(np.array([0, 2]))  # turn left vs move forward
    assert (info["elapsed_step"] == 0).all() and not term.any() and not trunc.any() and (reward == 0).all()
    np.testing.assert_array_equal(obs["image"][0], obs["image"][1])
    np.testing.assert_array_equal(obs["direction"], [0, 0])  # MiniGrid Memory starts facing right
    envs.close()


def test_wrapper_marks_the_terminal_observation_and_the_next_step_first_and_counts_successes():
    envs = minigrid.Envs(ENV_ID, [11, 12, 13], torch.device("cpu"))
    assert envs.first.all() and not envs.terminal_obs.any() and envs.num_actions == 3
    g = torch.Generator().manual_seed(0)
    ended, prev_terminal = [], envs.terminal_obs.clone()
    for _ in range(600):
        reward, term, episodes = envs.step(torch.randint(0, 3, (3,), generator=g))
        assert torch.equal(envs.first, prev_terminal)  # first exactly one step after the terminal observation
        for i, episode_return, length, success in episodes:
            assert envs.terminal_obs[i] and length > 0
            assert success == (episode_return > 0) and (not success or 0 < episode_return <= 1)
            ended.append(success)
        prev_terminal = envs.terminal_obs.clone()
    envs.close()
    assert True in ended and False in ended, "random play both succeeds and fails in S7"


@pytest.mark.parametrize("env_id,kept", [("CartPole-v1", [0, 2]), ("Acrobot-v1", [0, 1, 2, 3])])
def test_masked_classic_control_shows_positions_only_and_counts_successes(env_id, kept):
    envs = minigrid.Envs(env_id, [3, 4], torch.device("cpu"))
    raw = envpool.make(env_id, env_type="gymnasium", num_envs=2, env_seed=[3, 4])
    raw_obs, _ = raw.reset()
    torch.testing.assert_close(envs.obs, torch.as_tensor(raw_obs[:, kept]))  # velocities hidden
    assert envs.obs_shape == (len(kept),) and envs.num_actions == raw.action_space.n
    for _ in range(30):
        action = torch.randint(0, envs.num_actions, (2,))
        raw_obs, _, term, trunc, _ = raw.step(action.numpy())
        _, _, episodes = envs.step(action)
        torch.testing.assert_close(envs.obs, torch.as_tensor(raw_obs[:, kept]))
        for i, _, _, success in episodes:  # CartPole: success = lasting to the limit; Acrobot: swinging up
            assert success == bool(trunc[i] if env_id == "CartPole-v1" else term[i])
    envs.close(), raw.close()


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
def run_script(tmp_path, *flags):
    return helpers.run_script(SCRIPT, tmp_path, *flags)


# tbptt and ff take the update path lstm takes (autograd within the rollout; checked in-process for every core)
@pytest.mark.parametrize("core,num_steps", [("rtrl", 8), ("lstm", 8), ("rtrl", 1)])
def test_training_run_writes_scalars_and_a_loadable_checkpoint(tmp_path, core, num_steps):
    steps = 4 * num_steps * (100 if num_steps > 1 else 400)
    proc = run_script(
        tmp_path,
        "--core",
        core,
        "--num-envs",
        "4",
        "--num-steps",
        str(num_steps),
        "--total-timesteps",
        str(steps),
        "--hidden-size",
        "16",
        "--eval-episodes",
        "3",
        "--save-model",
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{ENV_ID}__rtrl_a2c_minigrid__{core}__T{num_steps}__1__*"))
    scalars = checks.read_scalars(run_dir)
    checks.check_update_scalars(scalars, iterations=steps // (4 * num_steps))
    assert len(scalars["charts/episodic_return"]) == len(scalars["charts/success"]) >= 5  # S7 episodes are short
    assert set(scalars["charts/success"]) <= {0.0, 1.0}
    assert len(scalars["eval/episodic_return"]) == len(scalars["eval/success"]) == 3  # one episode per eval env
    assert "eta=" in proc.stdout and "elapsed=" in proc.stdout

    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert checkpoint["args"]["core"] == core and not glob.glob(os.path.join(run_dir, "*.tmp"))
    agent = minigrid.Agent((minigrid.Envs.OBS_SIZE,), 3, checkpoint["args"]["hidden_size"], core)
    agent.load_state_dict(checkpoint["model"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--env-id", "MiniGrid-MemoryS8-v0"], "did you mean MiniGrid-MemoryS9-v0, MiniGrid-MemoryS7-v0"),
        (["--env-id", "Breakout-v5"], "unknown env id 'Breakout-v5' (MiniGrid-* or CartPole-v1 / Acrobot-v1)"),
        (["--total-timesteps", "10", "--num-envs", "4", "--num-steps", "5"], "less than one rollout"),
        (["--run-name", "../elsewhere"], "--run-name names one directory under runs/"),
        (["--env-id", "CartPole-v1", "--actions", "full"], "--actions full is for MiniGrid"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: minigrid.check_args(minigrid.parse_args(argv)[0]), flags, message, capsys)


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = run_script(tmp_path, "--max-grad-norm", "0")
    checks.check_bad_input_is_a_one_line_error(proc, "--max-grad-norm must be positive", tmp_path)


# ---------------------------------------------------------------------------------------------
# Masked CartPole through the same agent, and a run directory to itself (--resume, Ctrl-C, SIGTERM and the other
# long-run claims: tests/test_every_script.py)
# ---------------------------------------------------------------------------------------------
CARTPOLE = ("--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "4", "--hidden-size", "8", "--checkpoint-every", "16")
SAVED_STEP = 48  # 6 updates of 2 envs x 4 steps; checkpoints at 16, 32, 48 (the end)


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """The directory of a masked-CartPole run, runs/a, with its checkpoints, evaluation and model.pt."""
    tmp_path = tmp_path_factory.mktemp("cartpole")
    proc = run_script(
        tmp_path, *CARTPOLE, "--total-timesteps", str(SAVED_STEP), "--eval-episodes", "2", "--save-model", "--run-name", "a"
    )
    assert proc.returncode == 0, proc.stderr
    return tmp_path


def test_masked_cartpole_trains_through_the_same_agent(cartpole_run):
    scalars = checks.read_scalars(cartpole_run / "runs" / "a")
    checks.check_update_scalars(scalars, iterations=SAVED_STEP // 8)
    assert len(scalars["charts/episodic_return"]) >= 1 and len(scalars["eval/episodic_return"]) == 2
    agent = minigrid.Agent((2,), 2, 8, "rtrl")
    agent.load_state_dict(torch.load(cartpole_run / "runs" / "a" / "model.pt", weights_only=True)["model"])


def test_a_run_directory_is_never_shared(cartpole_run):
    run_dir = cartpole_run / "runs" / "a"
    before = {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)}
    assert "checkpoint.pt" in before
    proc = run_script(cartpole_run, *CARTPOLE, "--total-timesteps", str(SAVED_STEP), "--run-name", "a")
    assert proc.returncode == 2 and "runs/a exists" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)} == before
