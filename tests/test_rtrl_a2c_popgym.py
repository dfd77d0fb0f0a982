"""rtrl_a2c_popgym.py: popgym's environments as the agent sees them (one-hot observations, the previous action, the
step on a terminal observation, a truncation), MMER and the last 10% as logged, its runs and its bad input. The claims
it shares with the other scripts (the eLSTM, the update, populations) are in tests/test_every_script.py."""

import os

import claims as checks
import gymnasium as gym
import helpers
import numpy as np
import pytest
import torch
import tyro

import rtrl_a2c_popgym as pg

SCRIPT = pg.__file__


# ---------------------------------------------------------------------------------------------
# popgym's environments as the script steps them
# ---------------------------------------------------------------------------------------------
def reference_encoding(space, obs):
    """One-hot by position, part by part, written from the observation space alone."""
    if isinstance(space, gym.spaces.Box):
        return list(np.asarray(obs, dtype=np.float32).ravel())
    if isinstance(space, gym.spaces.Discrete):
        parts = [(int(space.n), obs)]
    elif isinstance(space, gym.spaces.Tuple):
        parts = [(int(s.n), o) for s, o in zip(space.spaces, obs)]
    else:  # MultiDiscrete
        parts = list(zip(np.ravel(space.nvec), obs))
    return [float(i == o) for n, o in parts for i in range(n)]


@pytest.mark.parametrize(
    "task", ["RepeatPreviousEasy", "CountRecallMedium", "AutoencodeEasy", "NoisyPositionOnlyCartPoleEasy"]
)
def test_observations_are_one_hot_with_the_previous_action_and_episodes_end_on_a_terminal_step(task):
    """Side by side with the same popgym environments stepped directly (same seeds, same actions): each observation is
    its encoding then the previous action one-hot (zeros at an episode's start); the step ending an episode returns its
    last observation as `terminal_obs` and reports the episode's return and length; the next step ignores its action
    and starts the next episode (`first`, last reward 0)."""
    env_id, seeds, num_envs = f"popgym-{task}-v0", pg.env_seeds(5, 3), 3
    envs = pg.Envs(env_id, seeds, torch.device("cpu"))
    direct = [gym.make(env_id, disable_env_checker=True) for _ in range(num_envs)]
    obs = [env.reset(seed=int(s))[0] for env, s in zip(direct, seeds)]
    space, n = direct[0].observation_space, envs.num_actions
    prev, ret, length, terminal, ends = [None] * num_envs, [0.0] * num_envs, [0] * num_envs, [False] * num_envs, 0
    g = np.random.default_rng(0)
    for _ in range(160):
        for b in range(num_envs):
            one_hot = [float(prev[b] == a) for a in range(n)]
            assert envs.obs[b].tolist() == pytest.approx(reference_encoding(space, obs[b]) + one_hot), b
            assert bool(envs.terminal_obs[b]) == terminal[b]
        actions = g.integers(0, n, num_envs)
        reward, term, ended = envs.step(torch.as_tensor(actions))
        expected = []
        for b in range(num_envs):
            if terminal[b]:  # the action is ignored: a new episode
                obs[b], prev[b], terminal[b] = direct[b].reset()[0], None, False
                assert envs.first[b] and reward[b] == 0 and not term[b]
                continue
            obs[b], r, te, tr, _ = direct[b].step(int(actions[b]))
            prev[b], ret[b], length[b] = int(actions[b]), ret[b] + r, length[b] + 1
            assert reward[b] == pytest.approx(r) and bool(term[b]) == te and not envs.first[b]
            if te or tr:
                expected.append((b, pytest.approx(ret[b]), length[b]))
                ret[b], length[b], terminal[b] = 0.0, 0, True
        assert ended == expected
        ends += len(ended)
    assert ends >= num_envs  # every env ended an episode


def test_a_time_limit_is_a_truncation_not_a_termination():
    """PositionOnlyCartPole's limit (here 3 steps): the episode ends, nothing terminates, so its value bootstraps."""
    envs = pg.Envs("popgym-PositionOnlyCartPoleEasy-v0", pg.env_seeds(1, 2), torch.device("cpu"))
    for env in envs.envs:
        env.unwrapped.max_episode_length = 3
    for _ in range(2):
        reward, term, ended = envs.step(torch.zeros(2, dtype=torch.long) + torch.tensor([0, 1]))
        assert not term.any() and not ended
    reward, term, ended = envs.step(torch.tensor([1, 0]))
    assert not term.any() and envs.terminal_obs.all() and [(i, n) for i, _, n in ended] == [(0, 3), (1, 3)]
    assert reward.tolist() == pytest.approx([1 / 3, 1 / 3])  # popgym's scaled reward: 1 / max length per step


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
def rolling_best(returns, window):
    return max(np.mean(returns[i : i + window]) for i in range(len(returns) - window + 1))


@pytest.mark.parametrize("core,num_steps", [("rtrl", 4), ("tbptt", 4), ("lstm", 52), ("ff", 4)])
def test_a_run_logs_every_episode_mmer_and_the_last_tenth(tmp_path, core, num_steps):
    """RepeatPreviousEasy: 51 steps and a terminal one per episode, 4 envs; MMER is the best mean of 5 consecutive
    episodes as logged (in the order they ended), the last 10% the mean of those ending in its last tenth of steps."""
    flags = ["--num-envs", "4", "--total-timesteps", "1248", "--hidden-size", "8", "--mmer-window", "5", "--save-model"]
    proc = helpers.run_script(
        SCRIPT, tmp_path, "--env-id", "popgym-RepeatPreviousEasy-v0", "--core", core, "--num-steps", str(num_steps), *flags
    )
    assert proc.returncode == 0, proc.stderr
    (name,) = os.listdir(tmp_path / "runs")
    assert name.startswith(f"popgym-RepeatPreviousEasy-v0__rtrl_a2c_popgym__{core}__T{num_steps}__1__")
    events = helpers.scalar_steps(tmp_path / "runs" / name)
    returns = [v for _, v in events["charts/episodic_return"]]
    total = (1248 // (4 * num_steps)) * 4 * num_steps
    assert len(returns) == total // 52 and {v for _, v in events["charts/episodic_length"]} == {51}
    assert all(-1 <= r <= 1 for r in returns)
    mmer = rolling_best(returns, 5)
    last = [v for step, v in events["charts/episodic_return"] if step > 0.9 * total]
    assert events["popgym/mmer"] == [(total, pytest.approx(mmer, abs=1e-6))]
    assert events["popgym/final_return"] == [(total, pytest.approx(np.mean(last), abs=1e-6))]
    assert (
        f"seed 1: MMER {mmer:.3f} (the best mean return of 5 consecutive episodes), last 10% {np.mean(last):.3f}"
        in proc.stdout
    )
    for tag in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/grad_norm", "charts/SPS"):
        assert all(np.isfinite([v for _, v in events[tag]])), tag
    model = torch.load(tmp_path / "runs" / name / "model.pt", weights_only=True)
    pg.Agent((4 + 4,), 4, 8, core).load_state_dict(model["model"])


def test_a_population_of_3_writes_three_complete_run_directories(tmp_path):
    flags = ["--num-envs", "2", "--total-timesteps", "416", "--hidden-size", "8", "--mmer-window", "2"]
    proc = helpers.run_population(SCRIPT, tmp_path, *flags)
    seen = []
    for seed in (4, 5, 6):
        events = helpers.scalar_steps(tmp_path / "runs" / f"pop__s{seed}")
        returns = [v for _, v in events["charts/episodic_return"]]
        assert len(returns) == 8 and f"seed {seed}: MMER {rolling_best(returns, 2):.3f}" in proc.stdout
        seen.append(tuple(returns))
    assert len(set(seen)) == 3  # three agents, not one logged thrice


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--env-id", "popgym-RepeatFirstEsy-v0"],
            "unknown popgym id 'popgym-RepeatFirstEsy-v0'; did you mean popgym-RepeatFirstEasy-v0",
        ),
        (["--env-id", "CartPole-v1"], "unknown popgym id 'CartPole-v1' (popgym-<Env><Easy|Medium|Hard>-v0)"),
        (["--env-id", "popgym-PositionOnlyPendulumEasy-v0"], "its actions are Box(-2.0, 2.0, (1,), float32)"),
        (["--num-steps", "832", "--total-timesteps", "10000"], "a rollout of --num-steps 832 x --num-envs 64 is more than"),
        (["--mmer-window", "0"], "--mmer-window must be at least 1, got 0"),
        (["--num-seeds", "0"], "--num-seeds must be at least 1, got 0"),
        (["--run-name", "a/b"], "--run-name names one directory under runs/"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: pg.check_args(tyro.cli(pg.Args, args=argv)), flags, message, capsys)


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = helpers.run_script(SCRIPT, tmp_path, "--env-id", "popgym-RepeatFirst")
    checks.check_bad_input_is_a_one_line_error(proc, "unknown popgym id 'popgym-RepeatFirst'", tmp_path)
