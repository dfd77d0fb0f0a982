"""Claims about rtrl_impala_dmlab.py, each checked against an independent float64 computation or what a run wrote.

DeepMind Lab cannot be installed here: its adapter is checked against tests/fake_deepmind_lab, a fake of the
`deepmind_lab` module's API with a known answer.
"""

import glob
import multiprocessing.connection
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import claims as checks  # the claims every script's ELSTM must meet, and the shared references
import helpers
import numpy as np
import pytest
import torch
import tyro
from helpers import episode_flags, rel_err

import rtrl_impala_dmlab as impala

SCRIPT = impala.__file__
FAKE_LAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_deepmind_lab")
OBS_SHAPE, NUM_ACTIONS, HIDDEN = (3, 12, 12), 4, 6


# ---------------------------------------------------------------------------------------------
# V-trace
# ---------------------------------------------------------------------------------------------
def reference_vtrace(rewards, values, bootstrap_value, log_rhos, terms, terminal_obs, gamma):
    """The IMPALA paper's definition (Espeholt et al. 2018, eq. 1), as a forward sum for each s:

        v_s = V(x_s) + sum_{t=s}^{s+n-1} gamma^{t-s} (prod_{i=s}^{t-1} c_i) rho_t (r_t + gamma V(x_{t+1}) - V(x_t))

    with rho = c = min(1, pi/mu), cut where the episode ends: a terminating step has no gamma V(x_{t+1}) and
    ends the sum; a step taking a terminal observation is where the sum stops, its V bootstrapping a truncation.
    Advantages rho_s (r_s + gamma v_{s+1} - V(x_s)), none on terminal observations."""
    steps, batch = rewards.shape
    rho = log_rhos.exp().clamp(max=1.0)
    value = lambda t, b: bootstrap_value[b] if t == steps else values[t, b]
    vs, advantages = torch.zeros(steps, batch, dtype=torch.float64), torch.zeros(steps, batch, dtype=torch.float64)
    for b in range(batch):
        for s in range(steps):
            total, weight = 0.0, 1.0
            for t in range(s, steps):
                if terminal_obs[t, b]:
                    break
                g = 0.0 if terms[t, b] else gamma
                total += weight * rho[t, b] * (rewards[t, b] + g * value(t + 1, b) - values[t, b])
                if terms[t, b]:
                    break
                weight *= gamma * rho[t, b]  # c_t, with c_bar = rho_bar = 1
            vs[s, b] = values[s, b] + total
        for s in range(steps):
            if not terminal_obs[s, b]:
                v_next = bootstrap_value[b] if s + 1 == steps else vs[s + 1, b]
                g = 0.0 if terms[s, b] else gamma
                advantages[s, b] = rho[s, b] * (rewards[s, b] + g * v_next - values[s, b])
    return vs, advantages


def random_vtrace_inputs(steps=12, batch=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    terms, terminal_obs, _ = episode_flags(steps, batch, g)
    assert terms.any() and (terminal_obs[1:] & ~terms[:-1]).any(), "needs both kinds of episode end"
    rewards = torch.rand(steps, batch, generator=g, dtype=torch.float64) * 2 - 1
    values = torch.randn(steps, batch, generator=g, dtype=torch.float64)
    bootstrap_value = torch.randn(batch, generator=g, dtype=torch.float64)
    return rewards, values, bootstrap_value, terms, terminal_obs


def script_vtrace(rewards, values, bootstrap_value, log_rhos, terms, terminal_obs, gamma):
    discounts = gamma * (~terms).double()
    return impala.vtrace(rewards, values, bootstrap_value, log_rhos, discounts, terminal_obs)


def test_vtrace_equals_the_impala_definition_with_clipped_ratios_and_episode_ends():
    rewards, values, bootstrap_value, terms, terminal_obs = random_vtrace_inputs()
    g = torch.Generator().manual_seed(4)
    log_pi = torch.log_softmax(torch.randn(*rewards.shape, 5, generator=g, dtype=torch.float64), -1)[..., 0]
    log_mu = torch.log_softmax(torch.randn(*rewards.shape, 5, generator=g, dtype=torch.float64), -1)[..., 0]
    log_rhos = log_pi - log_mu
    assert (log_rhos > 0).any() and (log_rhos < 0).any(), "needs clipped and unclipped ratios"
    expected = reference_vtrace(rewards, values, bootstrap_value, log_rhos, terms, terminal_obs, 0.9)
    got = script_vtrace(rewards, values, bootstrap_value, log_rhos, terms, terminal_obs, 0.9)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


def test_vtrace_on_policy_is_the_n_step_return():
    rewards, values, bootstrap_value, terms, terminal_obs = random_vtrace_inputs(seed=5)
    vs, _ = script_vtrace(rewards, values, bootstrap_value, torch.zeros_like(rewards), terms, terminal_obs, 0.9)
    flags = dict(terms=terms, terminal_obs=terminal_obs, deads=terminal_obs)  # claims.py's name, and the new one
    unroll = SimpleNamespace(rewards=rewards, values=values, **flags)
    torch.testing.assert_close(vs, checks.reference_returns(unroll, bootstrap_value, 0.9), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The actors' online sensitivities (the eLSTM's own claims: tests/test_every_script.py)
# ---------------------------------------------------------------------------------------------
def random_steps(steps, batch, seed):
    """Observations, last rewards and episode flags (terms, terminal_obs, firsts) of `steps` consecutive steps."""
    g = torch.Generator().manual_seed(seed)
    terms, terminal_obs, firsts = episode_flags(steps, batch, g)
    obs = torch.randint(0, 256, (steps, batch, *OBS_SHAPE), generator=g, dtype=torch.uint8)
    return obs, 3 * torch.randn(steps, batch, generator=g, dtype=torch.float64), terms, terminal_obs, firsts


def act_online(agent, obs, last_rewards, firsts, c, sens):
    """What an actor does: one agent.act per step, c and sens advancing online (Method §2)."""
    for t in range(len(obs)):
        _, _, c, sens = agent.act(obs[t], last_rewards[t], c, firsts[t], sens)
    return c, sens


def test_actor_online_sensitivities_equal_the_learners_chunked_ones():
    torch.manual_seed(0)
    agent = impala.Agent(OBS_SHAPE, NUM_ACTIONS, HIDDEN).double()
    obs, last_rewards, _, _, firsts = random_steps(9, 3, seed=6)
    c0 = torch.randn(3, HIDDEN, dtype=torch.float64)
    _, sens0 = agent.cell.initial_state(3)
    sens0 = {k: torch.randn_like(s) for k, s in sens0.items()}  # as if carried from earlier unrolls
    c, sens = act_online(agent, obs, last_rewards, firsts, c0, sens0)

    x = agent.features(obs, last_rewards).detach()
    _, learner_sens = agent.cell.rtrl(x, c0, firsts, sens0, torch.zeros(9, 3, HIDDEN, dtype=torch.float64), "chunked")
    torch.testing.assert_close(c, agent.cell(x, c0, firsts)[-1], rtol=1e-12, atol=1e-12)
    for k in checks.PARAMS:
        assert rel_err(sens[k], learner_sens[k]) < 1e-10, k


# ---------------------------------------------------------------------------------------------
# The learner's update
# ---------------------------------------------------------------------------------------------
def random_unroll_after_history(history, T, batch, seed=7):
    """An actor's history of `history` steps, then one unroll of T + 1 steps as the learner receives it."""
    obs, last_rewards, terms, terminal_obs, firsts = random_steps(history + T + 1, batch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    unroll = slice(history, history + T + 1)
    return (obs[:history], last_rewards[:history], firsts[:history]), {
        "obs": obs[unroll],
        "last_rewards": last_rewards[unroll],
        "firsts": firsts[unroll],
        "terminal_obs": terminal_obs[unroll],
        "terms": terms[history : history + T],
        "rewards": 3 * torch.randn(T, batch, generator=g, dtype=torch.float64),
        "actions": torch.randint(0, NUM_ACTIONS, (T, batch), generator=g),
        "logits": torch.randn(T, batch, NUM_ACTIONS, generator=g, dtype=torch.float64),
    }


def reference_unroll_loss(agent, history, unroll, core, args):
    """The unroll's loss as a function of all parameters, from Method §1 and §5 and the V-trace definition alone.

    The cell's start state depends on its parameters through the actor's whole history (rtrl), or is cut at the
    unroll's start (tbptt, lstm); the stem only sees the unroll. Step T only bootstraps.
    """
    T = len(unroll["actions"])
    resets = lambda firsts: torch.ones_like(firsts) if core == "ff" else firsts

    def features(o, r):
        return torch.cat(
            [
                agent.stem(o.flatten(0, 1).double() / 255).unflatten(0, o.shape[:2]),
                r.clamp(-1, 1)[..., None],
            ],
            -1,
        )

    cell = checks.spec_lstm if core == "lstm" else checks.spec_cell
    obs, last_rewards, firsts = history
    c = torch.zeros(obs.shape[1], 2 * HIDDEN if core == "lstm" else HIDDEN, dtype=torch.float64)
    c = cell(agent.cell, features(obs, last_rewards).detach(), c, resets(firsts))[-1]
    c = c.detach() if core in ("tbptt", "lstm") else c
    x = features(unroll["obs"], unroll["last_rewards"])
    cs = cell(agent.cell, x, c, resets(unroll["firsts"]))
    h = cs[..., :HIDDEN] if core == "lstm" else torch.sigmoid(agent.gate(torch.cat([x, cs], -1))) * cs
    logp, values = torch.log_softmax(agent.actor(h), -1)[:T], agent.critic(h)[..., 0]
    log_pi = logp.gather(-1, unroll["actions"][..., None])[..., 0]
    log_mu = torch.log_softmax(unroll["logits"], -1).gather(-1, unroll["actions"][..., None])[..., 0]
    terminal_obs = unroll["terminal_obs"][:T]
    vs, advantages = reference_vtrace(
        unroll["rewards"].clamp(-1, 1),
        values[:T].detach(),
        values[T].detach(),
        (log_pi - log_mu).detach(),
        unroll["terms"],
        terminal_obs,
        args.gamma,
    )
    live = (~terminal_obs).double()
    pg = -(live * log_pi * advantages).sum()
    entropy = -(live * (logp.exp() * logp).sum(-1)).sum()
    return pg + args.vf_coef * 0.5 * (live * (vs - values[:T]) ** 2).sum() - args.ent_coef * entropy


def actor_history_and_unroll(core, impl="chunked", frozen_stem=False):
    """An agent, an actor's history, the unroll that follows, and the unroll as the learner gets it: with the
    (c, sens) the actor carried to its start. Returns (agent, history, unroll, args, batch)."""
    torch.manual_seed(0)
    agent = impala.Agent(OBS_SHAPE, NUM_ACTIONS, HIDDEN, core, freeze_stem=frozen_stem).double()
    args = impala.Args(core=core, rtrl_impl=impl, unroll_length=5, gamma=0.9, freeze_stem=frozen_stem)
    history, unroll = random_unroll_after_history(11, 5, 3)
    c0, sens0 = act_online(agent, *history, *agent.initial_state(3))  # sens0 is {} but for rtrl
    return agent, history, unroll, args, {**unroll, "c0": c0, "sens0": sens0}


def learner_grads(agent, batch, args):
    agent.zero_grad(set_to_none=True)
    impala.compute_gradients(agent, batch, args)
    return {k: p.grad for k, p in agent.named_parameters()}


@pytest.mark.parametrize(
    "core,impl", [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked"), ("ff", "chunked")]
)
def test_update_gradients_equal_autograd_through_the_actors_history(core, impl):
    agent, history, unroll, args, batch = actor_history_and_unroll(core, impl)
    reference = lambda c: reference_unroll_loss(agent, history, unroll, c, args)
    checks.assert_grads_equal_reference(agent, learner_grads(agent, batch, args), reference, core)


@pytest.mark.parametrize("impl", ["chunked", "step"])
def test_frozen_stem_rtrl_gradients_equal_the_reference_and_step_goes_forward_in_time_only(monkeypatch, impl):
    """--freeze-stem: no stem gradient; the one backward pass (the loss's) reaches the heads alone; the gradient of
    every other parameter is exact. With --rtrl-impl step nothing goes backward through the cell's time steps:
    rtrl_scan (whose R_t runs from T back to 1) is not used."""

    def backward_in_time(*args, **kwargs):
        raise AssertionError("rtrl_scan: a pass backward through the unroll's time steps")

    agent, history, unroll, args, batch = actor_history_and_unroll("rtrl", impl, frozen_stem=True)
    if impl == "step":
        monkeypatch.setattr(impala.ELSTM, "rtrl_scan", backward_in_time)
    got = {}
    passes = checks.backward_passes(agent, lambda: got.update(learner_grads(agent, batch, args)))
    monkeypatch.undo()
    heads = {k for k, _ in agent.named_parameters() if k.startswith(("gate.", "actor.", "critic."))}
    assert len(passes) == 1 and passes[0] <= heads, passes
    assert all(got[k] is None for k in got if k.startswith("stem.")) and got["cell.w_z"] is not None
    trained = SimpleNamespace(
        cell=agent.cell, named_parameters=lambda: [(k, p) for k, p in agent.named_parameters() if p.requires_grad]
    )
    reference = lambda c: reference_unroll_loss(agent, history, unroll, c, args)
    checks.assert_grads_equal_reference(trained, got, reference, "rtrl")


# ---------------------------------------------------------------------------------------------
# The DeepMind Lab adapter, against the fake deepmind_lab
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def lab(monkeypatch):
    monkeypatch.syspath_prepend(FAKE_LAB)
    import deepmind_lab

    monkeypatch.setattr(deepmind_lab, "EPISODE_FRAMES", 30)
    return deepmind_lab


def test_dmlab_observations_are_72x96_rgb_from_each_envs_seeded_reset(lab):
    envs = impala.DmLabEnvs("rooms_watermaze", [11, 12])
    assert envs.obs.shape == (2, 3, 72, 96) and envs.obs.dtype == torch.uint8 and envs.first.all()
    seeds = [env.seeds[-1] for env in envs.labs]
    assert seeds[0] != seeds[1]
    for i in range(2):  # channel-first RGB: the fake's red channel is the episode's seed
        assert (envs.obs[i, 0] == seeds[i] % 256).all() and (envs.obs[i, 1] == 0).all()
    envs.close()


# IMPALA's action set as DMLab vectors, in DMLab's order: look left/right, look down/up, strafe, move, fire, jump, crouch
IMPALA_ACTIONS = [
    [0, 0, 0, 1, 0, 0, 0],
    [0, 0, 0, -1, 0, 0, 0],
    [0, 0, -1, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0, 0],
    [-20, 0, 0, 0, 0, 0, 0],
    [20, 0, 0, 0, 0, 0, 0],
    [-20, 0, 0, 1, 0, 0, 0],
    [20, 0, 0, 1, 0, 0, 0],
    [0, 0, 0, 0, 1, 0, 0],
]


def test_dmlab_nine_actions_are_impalas_action_vectors(lab):
    envs = impala.DmLabEnvs("rooms_watermaze", [1])
    for i, expected in enumerate(IMPALA_ACTIONS):
        envs.step(torch.tensor([i]))
        assert envs.labs[0].actions[-1].tolist() == expected, i
    assert impala.Agent((3, 72, 96), 9, 8).actor.out_features == len(IMPALA_ACTIONS) == impala.env_info("rooms_watermaze")[1]


def test_dmlab_action_repeat_sums_four_frames_and_an_episode_end_resets(lab):
    envs = impala.DmLabEnvs("rooms_watermaze", [5])
    forward = torch.tensor([0])
    for step in range(1, 8):  # 30-frame episodes: 7 steps of 4 frames, then one of 2
        reward, term, episodes = envs.step(forward)
        assert reward.item() == 4 and not term.item() and not episodes and not envs.first.item()
        assert envs.labs[0].num_steps() == 4 * step and (envs.obs[0, 1] == 4 * step).all()
    reward, term, episodes = envs.step(forward)
    assert reward.item() == 2 and term.item() and episodes == [(0, 30.0, 8)]
    assert envs.first.item() and not envs.terminal_obs.any() and len(envs.labs[0].seeds) == 2  # reset, with a new seed
    assert envs.labs[0].seeds[0] != envs.labs[0].seeds[1] and (envs.obs[0, 1] == 0).all()
    for action in range(1, 9):  # the fake rewards the exact Forward vector only: look left + forward earns nothing
        reward, term, _ = envs.step(torch.tensor([action]))
        assert reward.item() == 0 and term.item() == (action == 8), action  # 8 steps: the next episode's end


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda lab: lab.reset(seed=np.int64(3)), ValueError),  # numpy integers are not PyLong
        (lambda lab: lab.step([0, 0, 0, 1, 0, 0, 0]), TypeError),
        (lambda lab: lab.step(np.zeros(7, dtype=np.int64)), ValueError),
        (lambda lab: lab.step(np.zeros(8, dtype=np.intc)), ValueError),
        (lambda lab: lab.step(np.array([999, 0, 0, 1, 0, 0, 0], dtype=np.intc)), None),  # values are not checked
    ],
    ids=["numpy-seed", "list-action", "int64-action", "shape-8-action", "out-of-range"],
)
def test_the_fake_lab_fails_where_dmlab_module_c_does(lab, call, error):
    env = lab.Lab("contributed/dmlab30/rooms_watermaze", ["RGB_INTERLEAVED"], config={"width": "96", "height": "72"})
    env.reset(seed=1)
    if error is None:
        call(env)
    else:
        with pytest.raises(error):
            call(env)


def test_the_fake_lab_refuses_hold_out_and_dataset_levels_without_their_settings(lab):
    with pytest.raises(RuntimeError, match="hold-out"):
        lab.Lab("contributed/dmlab30/rooms_collect_good_objects_test", ["RGB_INTERLEAVED"], config={})
    with pytest.raises(RuntimeError, match="brady_konkle_oliva2008"):
        lab.Lab("contributed/dmlab30/psychlab_continuous_recognition", ["RGB_INTERLEAVED"], config={})


def test_dmlab_evaluates_the_held_out_variant_with_hold_out_levels_and_scalable_agents_mixer_seed(lab):
    train = impala.make_envs("rooms_collect_good_objects_train", [1], "/data/bko")
    test = impala.make_envs("rooms_collect_good_objects_train", [1, 2], "/data/bko", test=True)
    same = impala.make_envs("rooms_watermaze", [1], test=True)  # DMLab-30 has no other variant of it
    assert train.labs[0].level.endswith("/rooms_collect_good_objects_train") and "mixerSeed" not in train.labs[0].config
    assert all(env.level.endswith("/rooms_collect_good_objects_test") for env in test.labs)
    assert same.labs[0].level.endswith("/rooms_watermaze")
    for env in test.labs + same.labs:
        assert env.config["allowHoldOutLevels"] == "true" and env.config["mixerSeed"] == str(0x600D5EED)
    assert all(env.config["datasetPath"] == "/data/bko" for env in train.labs + test.labs)
    assert "datasetPath" not in same.labs[0].config


class EvalEnvs(checks.FakeEvalEnvs):
    def close(self):
        pass


def test_evaluation_plays_its_quotas_on_the_evaluation_envs_of_the_held_out_level(monkeypatch, tmp_path):
    """The quotas themselves: tests/test_every_script.py."""
    made = []
    monkeypatch.setattr(impala, "make_envs", lambda *a, test: made.append(test) or EvalEnvs([1, 3], [0.0, 1.0]))
    agent = impala.Agent(checks.Pixels.shape, checks.NUM_ACTIONS, checks.HIDDEN)
    args = impala.Args(env_id="rooms_collect_good_objects_train", eval_episodes=4)
    returns, level = impala.evaluate(agent, args, [1, 2], tmp_path)
    assert made == [True] and level == "rooms_collect_good_objects_test"
    assert [round(r, 6) for r in returns] == [0, 0.01, 1, 1.01]


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
TINY = ["--hidden-size", "16", "--unroll-length", "5", "--batch-size", "2"]


def user_env(tmp_path, fake_lab):
    """The environment of a run: its temp dir (actors' working dirs) inside tmp_path, one thread per process."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    if fake_lab:
        env["PYTHONPATH"] = os.pathsep.join([FAKE_LAB, env.get("PYTHONPATH", "")])
    return env


def run_script(tmp_path, *flags, fake_lab=False):
    return helpers.run_script(SCRIPT, tmp_path, *flags, env=user_env(tmp_path, fake_lab))


def run_dir(tmp_path, env_id):
    (path,) = glob.glob(str(tmp_path / "runs" / f"{env_id}__rtrl_impala_dmlab__*__1__*"))
    return path


def assert_nothing_left_behind(tmp_path):
    """No process (actor or environment) works in the run's temp dir, and the actors' working dirs are gone."""
    assert helpers.processes_under(tmp_path / "tmp") == []
    assert glob.glob(str(tmp_path / "tmp" / "rtrl_impala_*")) == []


def saved_agent(path, obs_shape, num_actions):
    """The agent of a run's model.pt, as a user loads it."""
    checkpoint = torch.load(os.path.join(path, "model.pt"), weights_only=True)
    agent = impala.Agent(obs_shape, num_actions, checkpoint["args"]["hidden_size"], checkpoint["args"]["core"])
    agent.load_state_dict(checkpoint["model"])
    assert not glob.glob(os.path.join(path, "*.tmp"))
    return agent, checkpoint["args"]


UPDATE_SCALARS = ("charts/SPS", "charts/learning_rate", "losses/policy_loss", "losses/value_loss", "losses/entropy")


def check_update_scalars(scalars, updates):
    """One of each per update, finite losses, the learning rate decaying; no timer on the training path."""
    for tag in (*UPDATE_SCALARS, "losses/grad_norm", "charts/policy_lag", "charts/unroll_age"):
        assert len(scalars[tag]) == updates, tag
    assert all(v == v and abs(v) < float("inf") for v in scalars["losses/value_loss"])
    assert scalars["charts/learning_rate"][0] > scalars["charts/learning_rate"][-1] > 0
    assert not [tag for tag in scalars if "rtrl_share" in tag]


def test_torchrun_two_ranks_end_with_identical_weights_and_rank_0_checkpoints_them(tmp_path):
    """Also the LSTM baseline end to end."""
    updates = 10
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        SCRIPT,
        *TINY,
        "--env-id",
        "rooms_watermaze",
        "--num-actors",
        "1",
        "--total-timesteps",
        str(updates * 2 * 5 * 2),
        "--eval-episodes",
        "0",
        "--core",
        "lstm",
        "--checkpoint-every",
        "60",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=user_env(tmp_path, True), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2: weights sha256 (\w+)", proc.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], proc.stdout
    # the progress line (rank 0's): the first update's, every 10 s, and the last one's, whose ETA is 0
    lines = re.findall(r"^global_step=(\d+) SPS=\d+ elapsed=(\S+) eta=(\S+) return\(", proc.stdout, re.MULTILINE)
    assert lines and lines[0][0] == "20" and lines[-1][0] == "200" and lines[-1][2] == "0s", proc.stdout
    assert all(re.fullmatch(r"\d+s|\d+m\d\ds|\d+h\d\dm", elapsed) for _, elapsed, _ in lines), lines
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))  # rank 0's alone, at the end of training
    checkpoint = torch.load(path, weights_only=True)
    assert (checkpoint["iteration"], checkpoint["global_step"], checkpoint["args"]["world_size"]) == (updates, 200, 2)
    agent = impala.Agent((3, 72, 96), 9, 16, "lstm")
    agent.load_state_dict(checkpoint["model"])
    assert impala.weights_digest(agent) == digests["0"]
    scalars = checks.read_scalars(run_dir(tmp_path, "rooms_watermaze"))  # rank 0 alone logs
    check_update_scalars(scalars, updates)
    for tag in ("charts/policy_lag", "charts/unroll_age", "charts/actor_hangs"):
        assert len(scalars[tag]) == updates and min(scalars[tag]) >= 0, tag
    # the fake's 30-frame episodes are 8 steps (7 of 4 frames, 1 of 2), each forward frame earning 1
    assert len(scalars["charts/episodic_length"]) >= 5 and set(scalars["charts/episodic_length"]) == {8}
    assert all(0 <= r <= 30 for r in scalars["charts/episodic_return"])
    assert_nothing_left_behind(tmp_path)


def actor_pids(learner):
    """The learner's actor processes (its spawned children, not multiprocessing's resource tracker)."""
    pids = []
    for pid in helpers.child_pids(learner):
        with open(f"/proc/{pid}/cmdline") as f:
            if "spawn_main" in f.read():
                pids.append(pid)
    return pids


def launch(tmp_path, env_id, *flags):
    """A run in the background (fake DMLab unless env_id is an EnvPool task)."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, "--env-id", env_id, *TINY, *flags],
        cwd=tmp_path,
        env=user_env(tmp_path, env_id == "rooms_watermaze"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_update(proc):
    """The running `proc`, once its first update printed."""
    for line in proc.stdout:
        if line.startswith("global_step="):
            return proc
    pytest.fail(f"the run ended before its first update: {proc.communicate()[1][-2000:]}")


def start_run(tmp_path, env_id, *flags):
    return first_update(launch(tmp_path, env_id, *flags))


def pipes(pid):
    """The pipes a process holds open, but for its standard streams (pytest's pipes, shared by the whole run)."""
    fds = [fd for fd in glob.glob(f"/proc/{pid}/fd/*") if int(os.path.basename(fd)) > 2]
    return {os.readlink(fd) for fd in fds if os.readlink(fd).startswith("pipe:")}


def test_vizdoom_stand_in_restarts_a_killed_actor_whose_processes_do_not_outlive_it_saves_and_evaluates(tmp_path):
    """Also the paper's second stage end to end: RTRL on a pretrained stem kept frozen (the saved stem is the
    pretrained one after the updates)."""
    updates = 30
    pretrained = impala.Agent((3, 72, 96), 18, 8, "tbptt")  # any core: only its stem is read
    impala.save_checkpoint(pretrained, impala.Args(core="tbptt"), str(tmp_path / "pretrained.pt"))
    proc = start_run(
        tmp_path,
        "MyWayHome-v1",
        "--num-actors",
        "2",
        "--total-timesteps",
        str(updates * 10),
        "--eval-episodes",
        "1",
        "--save-model",
        "--init-stem-from",
        "pretrained.pt",
        "--freeze-stem",
    )
    before = actor_pids(proc.pid)
    assert len(before) == 2
    # A ViZDoom process holding an actor's pipe to the learner would keep a message cut off by the kill open forever
    vizdoom = [pid for actor in before for pid in helpers.child_pids(actor)]
    assert vizdoom and not pipes(proc.pid) & {p for pid in vizdoom for p in pipes(pid)}
    os.kill(before[0], signal.SIGKILL)  # its ViZDoom process survives that, and ignores SIGTERM
    deadline, replaced = time.time() + 60, False
    while time.time() < deadline and proc.poll() is None and not replaced:
        replaced = bool(set(actor_pids(proc.pid)) - set(before))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=300)
    assert replaced, "no new actor process appeared"
    assert proc.returncode == 0, err[-3000:]
    assert f"actor 0 (pid {before[0]}) died with exit code -9; restarting it" in out
    path = run_dir(tmp_path, "MyWayHome-v1")
    scalars = checks.read_scalars(path)
    check_update_scalars(scalars, updates)
    assert scalars["charts/actor_restarts"][-1] == 1 and scalars["charts/actor_hangs"][-1] == 0
    assert len(scalars["eval/episodic_return"]) == 1 and "episodes of MyWayHome-v1" in out  # a whole ViZDoom episode
    agent, _ = saved_agent(path, (3, 72, 96), 18)
    for k, v in pretrained.stem.state_dict().items():
        assert torch.equal(agent.stem.state_dict()[k], v), k
    assert not (tmp_path / "_vizdoom").exists()
    assert_nothing_left_behind(tmp_path)


# ---------------------------------------------------------------------------------------------
# Long runs: Ctrl-C / SIGTERM, --checkpoint-every, --resume
# ---------------------------------------------------------------------------------------------
STOPPED = ("--num-actors", "1", "--total-timesteps", "1000000")  # with TINY, RTRL on the fake DMLab
RESUMED = (*TINY, "--env-id", "rooms_watermaze", "--num-actors", "1", "--eval-episodes", "0")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Two runs of the same flags and seed, started together, stopped after their first update by SIGINT and by
    SIGTERM: {signum: the run (its dir, exit code, output, actors' pids, run name, checkpoint, scalars)}."""
    dirs = {signum: tmp_path_factory.mktemp(signal.Signals(signum).name) for signum in (signal.SIGINT, signal.SIGTERM)}
    procs = {signum: launch(path, "rooms_watermaze", *STOPPED) for signum, path in dirs.items()}
    runs = {}
    for signum, proc in procs.items():
        actors = actor_pids(first_update(proc).pid)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        path = dirs[signum]
        runs[signum] = SimpleNamespace(
            dir=path,
            returncode=proc.returncode,
            out=out,
            err=err,
            actors=actors,
            name=os.path.basename(run_dir(path, "rooms_watermaze")),
        )
        checkpoint = path / "runs" / runs[signum].name / "checkpoint.pt"
        runs[signum].saved = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else None
        runs[signum].scalars = helpers.scalar_steps(path / "runs" / runs[signum].name)
    return runs


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_finishes_the_update_stops_every_process_and_writes_a_checkpoint(stopped, signum):
    """Without --checkpoint-every or --save-model: the checkpoint holds the last update logged, and loads with
    weights_only=True; no model.pt (that is --save-model's, at the end of training), no evaluation."""
    run = stopped[signum]
    assert run.returncode == 128 + signum and run.saved is not None, run.err[-3000:]
    path, saved = f"runs/{run.name}/checkpoint.pt", run.saved
    assert (
        f"stopped by {signal.Signals(signum).name} at global_step={saved['global_step']}; continue with --resume {path}"
        in run.out
    )
    assert saved["global_step"] == 10 * saved["iteration"] == run.scalars["charts/SPS"][-1][0] >= 10
    assert saved["script"] == "rtrl_impala_dmlab.py" and saved["args"]["total_timesteps"] == 1000000
    assert saved.keys() == {"script", "model", "args", "optimizer", "run_name", "iteration", "global_step"}
    assert sorted(f for f in os.listdir(run.dir / "runs" / run.name) if not f.startswith("events.")) == ["checkpoint.pt"]
    assert "greedy evaluation" not in run.out
    assert len(run.actors) == 1 and not set(run.actors) & set(helpers.processes_under("/"))
    assert_nothing_left_behind(run.dir)


def test_the_same_seed_logs_identical_losses_for_the_first_update(stopped):
    """With one actor the first batch is that actor's first unrolls, made with the initial weights: the same in
    both runs, float for float. Later batches are not compared: which weights the actor had loaded when it began
    an unroll depends on timing (the learner is asynchronous)."""
    a, b = stopped[signal.SIGINT].scalars, stopped[signal.SIGTERM].scalars
    losses = [tag for tag in a if tag.startswith("losses/")]
    assert len(losses) == 4 and all(a[tag][0] == b[tag][0] and a[tag][0][0] == 10 for tag in losses), losses


def run_in_process(tmp_path, flags, monkeypatch):
    """The script's main block in this process, in tmp_path, as `python SCRIPT FLAGS` runs it on the fake DMLab,
    without an interpreter start; its actors are spawned as the script's are. The signal handlers and thread
    count it sets are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    monkeypatch.syspath_prepend(FAKE_LAB)  # the spawned actors inherit sys.path and the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    handlers, threads = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, torch.get_num_threads()
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)


def copy_of(run, tmp_path):
    """A copy of a stopped run's directory to resume (resuming writes its checkpoint); the checkpoint's path."""
    shutil.copytree(run.dir / "runs", tmp_path / "runs")
    return f"runs/{run.name}/checkpoint.pt"


def test_resume_alone_restores_every_tensor_bit_for_bit(stopped, tmp_path, monkeypatch, capsys):
    """`--resume PATH` and nothing else: the run's flags come from the checkpoint. Resumed with no update left to make
    (--total-timesteps at its step, given on the command line, wins), the learner loads its checkpoint and writes it
    again (--checkpoint-every, also given) with no actor started; the optimizer takes the flags given, not its own."""
    run = stopped[signal.SIGINT]
    checkpoint, step = copy_of(run, tmp_path), run.saved["global_step"]
    # as a global setting may have left it (set directly: pytest 9.2's monkeypatch cannot undo this attribute);
    # the script turns it off again, torch's default
    torch.backends.cuda.matmul.allow_tf32 = True
    flags = ["--resume", checkpoint, "--total-timesteps", str(step), "--checkpoint-every", "10", "--rms-eps", "0.02"]
    run_in_process(tmp_path, flags, monkeypatch)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the script asks for full float32 matmuls itself
    out = capsys.readouterr().out
    assert f"resumed runs/{run.name} at global_step={step}: actors start new episodes from zero state" in out
    assert torch.initial_seed() == np.random.SeedSequence([1, step]).generate_state(1)[0]  # reseeded from (seed, step)
    assert "device: cpu (--cuda: no CUDA device found)\n" in out  # --cuda is the default; no GPU here
    again = torch.load(tmp_path / checkpoint, weights_only=True)
    for key in ("model", "iteration", "global_step", "run_name", "script"):
        assert helpers.same_tensors(run.saved[key], again[key]), key
    (saved_group,), (group,) = run.saved["optimizer"]["param_groups"], again["optimizer"]["param_groups"]
    assert run.saved["optimizer"]["state"] and helpers.same_tensors(
        run.saved["optimizer"]["state"], again["optimizer"]["state"]
    )
    # the flags' (the learning rate is annealed from at the next update), not the checkpoint's optimizer's
    assert group == saved_group | {"lr": impala.Args().learning_rate, "eps": 0.02}
    changed = {k: v for k, v in again["args"].items() if v != run.saved["args"][k]}
    assert changed == dict(resume=checkpoint, total_timesteps=step, num_updates=step // 10, checkpoint_every=10, rms_eps=0.02)
    assert_nothing_left_behind(tmp_path)


def first_episode_seed(start_step):
    """The reset seed of the first episode of actor 0 (rank 0, first incarnation) in a run started at start_step."""
    rng = impala.actor_seed(impala.Args(), 0, 0, 0, start_step)
    rng.integers(2**31 - 1)  # its torch seed
    return int(np.random.default_rng(int(rng.choice(2**31 - 1, size=1, replace=False)[0])).integers(2**31 - 1))


def test_a_resumed_run_goes_on_from_its_step_with_new_episodes_from_zero_state(stopped, tmp_path, monkeypatch):
    """`--resume PATH --total-timesteps N` extends the run: the run directory's scalars are one run's (one per update,
    none twice), the learning rate goes on from the checkpoint's update, checkpoints come every --checkpoint-every
    steps, and the actor's first unroll starts new episodes (not the original run's: other seeds) from zero c and
    sensitivities."""
    run = stopped[signal.SIGINT]
    checkpoint, step, iteration = copy_of(run, tmp_path), run.saved["global_step"], run.saved["iteration"]
    first_unrolls, checkpoints = {}, []
    recv, save = multiprocessing.connection.Connection.recv, torch.save

    def recv_and_keep(self):
        item = recv(self)
        first_unrolls.setdefault(item["actor"], item)
        return item

    monkeypatch.setattr(multiprocessing.connection.Connection, "recv", recv_and_keep)
    monkeypatch.setattr(torch, "save", lambda obj, path: checkpoints.append(obj["global_step"]) or save(obj, path))
    flags = ["--resume", checkpoint, "--total-timesteps", str(step + 30), "--checkpoint-every", "20", "--eval-episodes", "0"]
    run_in_process(tmp_path, flags, monkeypatch)
    assert checkpoints == [step + 20, step + 30]  # every 20 steps, and at the end
    scalars = helpers.scalar_steps(tmp_path / "runs" / run.name)
    for tag in UPDATE_SCALARS:
        assert [s for s, _ in scalars[tag]] == list(range(10, step + 31, 10)), tag
    lr, lr0 = dict(scalars["charts/learning_rate"]), impala.Args().learning_rate
    assert lr[step] == pytest.approx(lr0 * (1 - (iteration - 1) / 100000))  # the first run's 1000000 steps
    assert lr[step + 10] == pytest.approx(lr0 * (1 - iteration / (iteration + 3)))  # goes on to the new total
    after = [(s, length) for s, length in scalars["charts/episodic_length"] if s > step]
    assert after and all(length <= s - step for s, length in after)  # one env: its steps since the resume
    (unroll,) = first_unrolls.values()
    assert unroll["firsts"][0].all() and (unroll["obs"][0, :, 1] == 0).all()  # the fake's frame count: a first frame
    assert not unroll["c0"].any() and not any(s.any() for s in unroll["sens0"].values())
    assert unroll["obs"][0, 0, 0, 0, 0] == first_episode_seed(step) % 256 != first_episode_seed(0) % 256
    assert_nothing_left_behind(tmp_path)


@pytest.mark.parametrize(
    "change,flags,message",
    [
        (None, ["--resume", "missing.pt"], "--resume missing.pt: [Errno 2] No such file or directory: 'missing.pt'"),
        ("truncate", [], "PytorchStreamReader failed"),
        ("weights only", [], "a model.pt holds the weights only: resume from a checkpoint.pt"),
        ("two learners", [], "its run had 2 learners, this one 1"),  # torchrun's WORLD_SIZE: each update's batch
        (None, ["--hidden-size", "64"], "does not fit: Error(s) in loading state_dict for Agent: size mismatch for cell.w_z"),
        (
            None,
            ["--core", "lstm"],
            'Error(s) in loading state_dict for Agent: Missing key(s) in state_dict: "cell.cell.weight_ih"',
        ),
        (
            None,
            ["--freeze-stem"],
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_a_one_line_error(stopped, tmp_path, monkeypatch, capsys, change, flags, message):
    """Before anything is written or any actor starts: run in-process, main exits 2 with load_state_dict's message."""
    run = stopped[signal.SIGINT]
    path = tmp_path / "ck.pt"
    if change == "truncate":
        path.write_bytes((run.dir / "runs" / run.name / "checkpoint.pt").read_bytes()[:3000])
    else:
        edited = {
            "weights only": {"model": run.saved["model"], "args": run.saved["args"]},
            "two learners": {**run.saved, "args": {**run.saved["args"], "world_size": 2}},
        }
        torch.save(edited.get(change, run.saved), path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        short = ["--total-timesteps", "20", "--eval-episodes", "0"]  # were it accepted: an update at most
        run_in_process(tmp_path, ["--resume", str(path), *short, *flags], monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_the_script_checks_a_checkpoint_before_it_writes_or_starts_anything(stopped, tmp_path):
    run = stopped[signal.SIGINT]
    checkpoint = copy_of(run, tmp_path)
    run_path = tmp_path / os.path.dirname(checkpoint)
    before = {f: (run_path / f).read_bytes() for f in os.listdir(run_path)}
    proc = run_script(tmp_path, "--resume", checkpoint, "--hidden-size", "64", fake_lab=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "size mismatch for cell.w_z" in proc.stderr
    assert {f: (run_path / f).read_bytes() for f in os.listdir(run_path)} == before
    assert_nothing_left_behind(tmp_path)


class OnFakeGPU(torch.Tensor):
    """A tensor as if on a GPU: only .cpu() makes it a plain tensor, and torch.load(weights_only=True) refuses it."""

    def cpu(self):
        return self.as_subclass(torch.Tensor)


def test_a_checkpoint_holds_cpu_copies_and_loads_into_a_fresh_agent_and_optimizer(tmp_path, monkeypatch):
    """The model's and the optimizer's tensors go to the CPU: a file written on a GPU loads on a machine without
    one, by torch.load without map_location, and restores the same bits."""
    torch.manual_seed(0)
    agent = impala.Agent(OBS_SHAPE, NUM_ACTIONS, HIDDEN)
    optimizer = torch.optim.RMSprop(agent.parameters())
    for p in agent.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # RMSprop's running averages: tensors in the optimizer state
    on_gpu = lambda tree: {k: on_gpu(v) if isinstance(v, dict) else v.as_subclass(OnFakeGPU) for k, v in tree.items()}
    model, state = on_gpu(agent.state_dict()), optimizer.state_dict()
    monkeypatch.setattr(agent, "state_dict", lambda: model)
    path = str(tmp_path / "checkpoint.pt")
    impala.save_checkpoint(agent, impala.Args(), path, optimizer={**state, "state": on_gpu(state["state"])}, iteration=1)
    loaded = torch.load(path, weights_only=True)
    assert not (tmp_path / "checkpoint.pt.tmp").exists() and loaded["iteration"] == 1
    fresh = impala.Agent(OBS_SHAPE, NUM_ACTIONS, HIDDEN)
    fresh.load_state_dict(loaded["model"])
    fresh_optimizer = torch.optim.RMSprop(fresh.parameters())
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    assert helpers.same_tensors(fresh.state_dict(), {k: v.cpu() for k, v in model.items()})
    assert helpers.same_tensors(fresh_optimizer.state_dict(), state)


def test_progress_gives_the_elapsed_time_and_an_eta_at_the_steps_per_second_so_far():
    assert impala.progress(12, 100, 0) == "elapsed=12s eta=0s"
    assert impala.progress(249, 1000, 1000) == "elapsed=4m09s eta=4m09s"
    assert impala.progress(59.6, 10, 600) == "elapsed=1m00s eta=59m36s"  # 3576 s left
    assert impala.progress(3599.6, 3600, 37_900) == "elapsed=1h00m eta=10h31m"  # 37,896 s left


# ---------------------------------------------------------------------------------------------
# The actors as the learner sees them: FIFO batches, a hung actor (in-process, with the fake DMLab)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3 actors of the fake DMLab, batches of 1 unroll, a 2 s hang deadline; a hang starts when `trigger` appears."""
    trigger = tmp_path_factory.mktemp("hang") / "trigger"
    with pytest.MonkeyPatch.context() as patch:  # the spawned actors inherit sys.path and the environment
        patch.syspath_prepend(FAKE_LAB)
        patch.setenv("FAKE_DMLAB_HANG_TRIGGER", str(trigger))
        patch.setenv("OMP_NUM_THREADS", "1")
        args = impala.Args(
            env_id="rooms_watermaze", num_actors=3, batch_size=1, unroll_length=2, hidden_size=8, core="ff", actor_timeout=2.0
        )
        agent = impala.Agent((3, 72, 96), 9, 8, "ff")
        actors = impala.ActorPool(args, (3, 72, 96), 9, 0, agent, str(tmp_path_factory.mktemp("actors")))
        actors.trigger = trigger
        try:
            yield actors
        finally:
            actors.stop()


def next_batch(actors):
    return actors.get_batch(lambda: False)


def test_a_learner_slower_than_its_actors_takes_the_oldest_unroll_so_every_actor_is_read(pool):
    deadline, seen = time.time() + 120, set()
    while seen != {0, 1, 2} and time.time() < deadline:  # every actor has started
        seen.update(next_batch(pool)["actors"])
    counts, ages = [0, 0, 0], []
    for _ in range(12):
        batch = next_batch(pool)
        counts[batch["actors"][0]] += 1
        ages.append(batch["unroll_age"])
        time.sleep(0.3)  # the learner's update: 3 actors' unrolls of 2 steps wait meanwhile
    assert min(counts) >= 3, counts  # in actor-index order: [11, 1, 0]
    assert min(ages) > 0


def test_an_actors_unrolls_overlap_by_their_bootstrap_step_and_carry_no_sensitivities_but_for_rtrl(pool):
    """T + 1 steps' inputs and T steps' outputs per unroll; an unroll's last step (it only bootstraps) is its
    actor's next unroll's first, the fake's frame counts telling the steps apart; the ff core's sens0 is {}."""
    unrolls = {}
    while not any(len(u) >= 3 for u in unrolls.values()):
        batch = next_batch(pool)
        unrolls.setdefault(batch["actors"][0], []).append(batch)
    (actor,) = [i for i, u in unrolls.items() if len(u) >= 3]
    for a, b in zip(unrolls[actor], unrolls[actor][1:]):
        assert len(a["obs"]) == len(a["firsts"]) == 3 and len(a["actions"]) == len(a["terms"]) == 2
        assert a["sens0"] == {} and a["c0"].shape == (1, 8)
        for k in impala.STEP_KEYS:
            assert torch.equal(a[k][-1], b[k][0]), k
        assert not torch.equal(a["obs"][-1], a["obs"][-2])  # the fake's frame count moved on


def test_an_actor_that_sends_nothing_is_killed_and_restarted(pool, capsys):
    pool.trigger.touch()  # the next step() of some actor's env never returns
    deadline = time.time() + 60
    while pool.hangs == 0 and time.time() < deadline:
        next_batch(pool)
    (hung,) = [i for i, n in enumerate(pool.incarnations) if n == 1]
    assert pool.hangs == 1 and not pool.trigger.exists()
    assert re.search(
        rf"actor {hung} \(pid \d+\) sent no unroll for .* s \(deadline 2\.0 s\): hung; restarting it", capsys.readouterr().out
    )
    while pool.sent[hung] == 0 and time.time() < deadline:  # its new process works
        next_batch(pool)
    assert pool.sent[hung] > 0 and pool.hangs == 1


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def parse(flags):
    """The script's own checks of a user's flags, in-process."""
    impala.check_args(tyro.cli(impala.Args, args=flags))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--env-id", "rooms_watermaz"], "did you mean rooms_watermaze"),
        (["--env-id", "MyWayHom-v1"], "did you mean MyWayHome-v1"),
        ([], "google-deepmind/lab"),  # the default level, without deepmind_lab
        (["--env-id", "MyWayHome-v1", "--batch-size", "3", "--envs-per-actor", "2"], "must be a multiple"),
        (["--env-id", "MyWayHome-v1", "--unroll-length", "0"], "--unroll-length must be positive, got 0"),
        (["--env-id", "MyWayHome-v1", "--learning-rate", "-1e-3"], "--learning-rate must be at least 0, got -0.001"),
        (["--env-id", "MyWayHome-v1", "--gamma", "1.5"], "--gamma and --rms-alpha must be at most 1"),
        (["--env-id", "MyWayHome-v1", "--total-timesteps", "100"], "less than one update"),
        (["--env-id", "MyWayHome-v1", "--actor-timeout", "0"], "--actor-timeout must be positive"),
        (["--env-id", "MyWayHome-v1", "--checkpoint-every", "-1"], "--checkpoint-every must be at least 0, got -1"),
        (["--env-id", "psychlab_continuous_recognition"], "images (see DMLab's data/): pass --dmlab-dataset-path"),
    ],
)
def test_bad_input_is_a_one_line_error(monkeypatch, capsys, flags, message):
    monkeypatch.syspath_prepend(FAKE_LAB)
    if not flags:
        monkeypatch.setitem(sys.modules, "deepmind_lab", None)  # not importable
    helpers.bad_input_in_process(parse, flags, message, capsys)


def test_a_checkpoint_of_another_observation_shape_is_refused_before_anything_starts(tmp_path):
    """main loads --init-stem-from before it writes a run directory or starts an actor."""
    impala.save_checkpoint(impala.Agent((3, 64, 64), 9, 8), impala.Args(), str(tmp_path / "other_shape.pt"))
    proc = run_script(tmp_path, "--env-id", "rooms_watermaze", "--init-stem-from", "other_shape.pt", fake_lab=True)
    message = "its stem does not fit this agent's (Error(s) in loading state_dict for Sequential: size mismatch for 3.weight"
    checks.check_bad_input_is_a_one_line_error(proc, message, tmp_path)
    assert_nothing_left_behind(tmp_path)


# ---------------------------------------------------------------------------------------------
# Devices (issue 14): ranks and GPUs, the device line, a CUDA run
# ---------------------------------------------------------------------------------------------
def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_more_ranks_than_gpus_under_cuda_is_a_one_line_error_naming_both_counts(monkeypatch, capsys):
    fake_gpus(monkeypatch, 1)
    cuda, no_cuda = impala.Args(cuda=True), impala.Args(cuda=False)
    with pytest.raises(SystemExit) as e:
        impala.pick_device(cuda, 1, 2)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--cuda: 2 ranks on this node but 1 GPU(s); start at most 1 (torchrun --nproc_per_node)" in err
    assert "--no-cuda for gloo on the CPU" in err
    assert impala.pick_device(no_cuda, 1, 2) == (torch.device("cpu"), "device: cpu")  # --no-cuda: gloo on the CPU
    fake_gpus(monkeypatch, 0)
    assert impala.pick_device(cuda, 0, 2) == (torch.device("cpu"), "device: cpu (--cuda: no CUDA device found)")
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {device}")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    # each rank its own GPU
    assert impala.pick_device(cuda, 1, 2) == (torch.device("cuda:1"), "device: cuda:1 (Fake GPU cuda:1, torch CUDA 12.4)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_two_updates_train_and_save_a_model_that_loads_on_the_cpu(tmp_path):
    proc = run_script(
        tmp_path,
        *TINY,
        "--env-id",
        "rooms_watermaze",
        "--num-actors",
        "1",
        "--total-timesteps",
        "20",
        "--eval-episodes",
        "0",
        "--save-model",
        "--cuda",
        fake_lab=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"device: cuda:0 ({torch.cuda.get_device_name(0)}, torch CUDA {torch.version.cuda})" in proc.stdout
    path = run_dir(tmp_path, "rooms_watermaze")
    check_update_scalars(checks.read_scalars(path), 2)
    saved = torch.load(os.path.join(path, "model.pt"), weights_only=True)  # no map_location: as written
    assert all(t.device.type == "cpu" for t in checks.all_tensors(saved))
    saved_agent(path, (3, 72, 96), 9)
