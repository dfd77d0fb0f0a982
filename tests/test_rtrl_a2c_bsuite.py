"""rtrl_a2c_bsuite.py: bsuite's episode timing as the agent sees it, bsuite's own score, the stem ablation, its
training runs and its bad input; populations (--num-seeds) against their single runs; a stem from another run,
frozen; the chrono forget gate. The claims it shares with the other scripts (the eLSTM, the update) are in
tests/test_every_script.py."""

import glob
import os

import claims as checks
import helpers
import numpy as np
import pytest
import torch
import tyro

import rtrl_a2c_bsuite as bs

SCRIPT = bs.__file__


# ---------------------------------------------------------------------------------------------
# bsuite's MemoryChain as the script steps it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id,length", [("memory_len/2", 3), ("memory_size/3", 2)])
def test_episodes_show_the_context_first_twice_the_query_last_and_reward_the_last_action(env_id, length):
    """Per episode the agent acts L + 1 times: on the reset observation and the next one (both show the context
    bits as +-1), then on L - 1 more, the last showing the query; only the last action is rewarded, +1 if it equals
    the queried context bit. The step after it starts the next episode (first, last reward 0)."""
    envs = bs.Envs(env_id, bs.env_seeds(3, 8), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    rewarded = set()
    for _ in range(4):
        assert envs.first.all() and (envs.last_reward == 0).all()
        seen = []
        for t in range(length + 1):
            seen.append(envs.obs.clone())
            action = torch.randint(0, 2, (8,), generator=g)
            reward, term, ended = envs.step(action)
            if t < length:
                assert not term.any() and not envs.first.any() and (reward == 0).all() and ended == []
        assert term.all() and ended == list(enumerate((reward > 0).tolist()))
        context = seen[0][:, 2:]
        assert (context.abs() == 1).all() and torch.equal(seen[1][:, 2:], context)
        assert all((obs[:, 2:] == 0).all() for obs in seen[2:])
        expected_time = [1.0] + [1 - t / length for t in range(length)]  # time left, before each action
        assert [obs[0, 0].item() for obs in seen] == pytest.approx(expected_time)
        query = seen[-1][:, 1].long()
        assert all((obs[:, 1] == 0).all() for obs in seen[:-1])
        answer = (context.gather(1, query[:, None]).squeeze(1) + 1) / 2
        assert torch.equal(reward, torch.where(action == answer, 1.0, -1.0))
        rewarded |= set(reward.tolist())
    assert rewarded == {-1.0, 1.0}


def test_bsuite_result_is_bsuites_score_of_the_first_10000_answers(monkeypatch):
    """3,000 wrong answers of the first 10,000: regret ratio 0.6, learned; 4,000: 0.8, not learned. Answers after
    the 10,000th do not count. The verdict is bsuite's function's: replaced, it changes."""
    right = lambda wrong: [False] * wrong + [True] * (10_000 - wrong) + [False] * 5_000
    assert bs.bsuite_result("memory_len/12", right(3_000)) == pytest.approx((0.3, 0.6, True))
    assert bs.bsuite_result("memory_size/4", right(4_000)) == pytest.approx((0.4, 0.8, False))
    frames = []
    monkeypatch.setattr(bs.memory_len_analysis, "score", lambda df: frames.append(df) or 0.0)
    assert bs.bsuite_result("memory_len/12", right(0))[2] is False
    (df,) = frames
    assert len(df) == 10_000 and (df.memory_length == 17).all() and df.total_perfect.iloc[-1] == 10_000
    monkeypatch.setattr(bs.memory_size_analysis, "score", lambda df: frames.append(df) or 1.0)
    assert bs.bsuite_result("memory_size/4", right(9_000))[2] is True
    assert (frames[-1].num_bits == 5).all()


# ---------------------------------------------------------------------------------------------
# The agent: no stem or an MLP, the forget-gate bias
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("core", ["rtrl", "tbptt"])
def test_the_mlp_stem_gets_its_gradient_through_the_cell_within_the_rollout(core):
    checks.check_update_gradients_equal_autograd(bs, core, "chunked", obs_kind=checks.VectorMLP, stem="mlp")


def test_without_a_stem_the_cell_reads_the_observation_and_last_reward():
    agent = bs.Agent((3,), 2, 8, "rtrl", stem="none")
    assert isinstance(agent.stem, torch.nn.Identity) and agent.cell.w_z.shape == (8, 3 + 1)
    obs, reward = torch.randn(5, 3), torch.tensor([0.0, 2.0, -3.0, 0.5, 1.0])
    assert torch.equal(agent.features(obs, reward), torch.cat([obs, reward.clamp(-1, 1)[:, None]], 1))


@pytest.mark.parametrize("core", ["rtrl", "lstm"])
def test_forget_bias_shifts_only_the_forget_gates_bias(core):
    torch.manual_seed(0)
    plain = bs.Agent((3,), 2, 8, core).state_dict()
    torch.manual_seed(0)
    shifted = bs.Agent((3,), 2, 8, core, forget_bias=2.5).state_dict()
    name, rows = ("cell.ih.bias", slice(8, 16)) if core == "lstm" else ("cell.b_f", slice(None))
    for k in plain:
        expected = plain[k].clone()
        if k == name:
            expected[rows] += 2.5
        assert torch.equal(shifted[k], expected), k


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "core,num_steps,stem",
    [
        ("rtrl", 4, "none"),
        ("rtrl", 1, "none"),
        ("rtrl", 4, "mlp"),
        ("tbptt", 4, "none"),
        ("lstm", 4, "none"),
        ("ff", 4, "none"),
    ],
)
def test_a_run_logs_every_episode_every_update_and_bsuites_result(tmp_path, core, num_steps, stem):
    """memory_len/2: 4 actions an episode, so 4 envs end 4 episodes every 4 steps: 32 episodes in 32 steps."""
    flags = ["--env-id", "memory_len/2", "--num-envs", "4", "--num-episodes", "32", "--hidden-size", "8"]
    proc = helpers.run_script(
        SCRIPT, tmp_path, *flags, "--core", core, "--num-steps", str(num_steps), "--stem", stem, "--save-model"
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"memory_len_2__rtrl_a2c_bsuite__{core}__T{num_steps}__1__*"))
    scalars = checks.read_scalars(run_dir)
    success, returns = scalars["charts/success"], scalars["charts/episodic_return"]
    assert len(success) == 32 and returns == [2 * s - 1 for s in success]
    updates = 32 // num_steps  # logged: every 10th update, from the first, and the last
    logged = len({u for u in range(1, updates + 1) if u % 10 == 1} | {updates})
    for tag in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/grad_norm", "charts/SPS"):
        assert len(scalars[tag]) == logged and all(np.isfinite(scalars[tag])), tag
    wrong = 1 - np.mean(success)
    assert scalars["bsuite/wrong_fraction"] == pytest.approx([wrong])
    assert scalars["bsuite/regret_ratio"] == pytest.approx([wrong / 0.5])
    assert scalars["bsuite/learned"] == [float(wrong < 0.375)]
    verdict = "learned" if wrong < 0.375 else "not learned"
    assert f"bsuite memory_len/2 {{'memory_length': 3}}, seed 1: {wrong:.3f} of the first 32 answers wrong" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-2].endswith(f": {verdict}")
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    agent = bs.Agent((3,), 2, 8, core, stem)
    agent.load_state_dict(model["model"])
    assert model["args"]["core"] == core and model["args"]["stem"] == stem


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--env-id", "memroy_len/4"],
            "unknown bsuite memory id 'memroy_len/4' (memory_len/0-22, memory_size/0-16); did you mean memory_len/4",
        ),
        (["--env-id", "catch/0"], "unknown bsuite memory id 'catch/0' (memory_len/0-22, memory_size/0-16)"),
        (
            ["--env-id", "memory_len/23"],
            "unknown bsuite memory id 'memory_len/23' (memory_len/0-22, memory_size/0-16); did you mean memory_len/3",
        ),
        (["--num-episodes", "0"], "--num-episodes must be at least 1"),
        (["--num-steps", "0"], "--num-steps must be at least 1"),
        (["--run-name", "a/b"], "--run-name names one directory under runs/"),
        (["--num-seeds", "0"], "--num-seeds must be at least 1, got 0"),
        (
            ["--env-id", "memory_len/30"],
            "unknown bsuite memory id 'memory_len/30' (memory_len/0-22, memory_size/0-16); memory length 30 is memory_len/15",
        ),
        (["--env-id", "memory_size/40"], "; 40 bits is memory_size/16"),
        (["--stem", "mlp", "--freeze-stem"], "--freeze-stem needs --init-stem-from"),
        (["--init-stem-from", "model.pt"], "--init-stem-from and --freeze-stem need --stem mlp"),
        (["--forget-init", "chrono", "--chrono-tmax", "1"], "--chrono-tmax must be at least 2 (timescales 2..T_max), got 1"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: bs.check_args(tyro.cli(bs.Args, args=argv)), flags, message, capsys)


def test_the_progress_line_has_no_eta_before_the_first_episode_ends():
    assert bs.progress(3.2, 0, 10_000) == "elapsed=3s eta=?"


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = helpers.run_script(SCRIPT, tmp_path, "--env-id", "memory_len/30")
    checks.check_bad_input_is_a_one_line_error(proc, "unknown bsuite memory id 'memory_len/30'", tmp_path)


# ---------------------------------------------------------------------------------------------
# Populations (--num-seeds K): K agents in one process, each its single run
# ---------------------------------------------------------------------------------------------
def test_a_population_of_3_writes_three_complete_run_directories(tmp_path):
    """Each agent's directory: every episode, the losses, bsuite's verdict line, its model (a single Agent's); and the
    verdicts printed are those the directories hold."""
    flags = ["--env-id", "memory_len/2", "--num-envs", "4", "--num-episodes", "32", "--hidden-size", "8"]
    proc = helpers.run_population(SCRIPT, tmp_path, *flags)
    successes = []
    for seed in (4, 5, 6):
        run_dir = tmp_path / "runs" / f"pop__s{seed}"
        scalars = checks.read_scalars(str(run_dir))
        assert len(scalars["charts/success"]) == 32 and len(scalars["losses/grad_norm"]) == 2
        wrong = 1 - np.mean(scalars["charts/success"])
        assert scalars["bsuite/wrong_fraction"] == pytest.approx([wrong])
        assert f"bsuite memory_len/2 {{'memory_length': 3}}, seed {seed}: {wrong:.3f} of the first 32" in proc.stdout
        bs.Agent((3,), 2, 8).load_state_dict(torch.load(run_dir / "model.pt", weights_only=True)["model"])
        successes.append(tuple(scalars["charts/success"]))
    assert len(set(successes)) == 3  # three agents, not one logged thrice


def test_an_existing_run_directory_of_any_agent_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "runs" / "pop__s2").mkdir(parents=True)
    proc = helpers.run_script(SCRIPT, tmp_path, "--num-seeds", "3", "--run-name", "pop", "--num-episodes", "16")
    assert proc.returncode == 2 and "runs/pop__s2 exists" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "runs") == ["pop__s2"] and not os.listdir(tmp_path / "runs" / "pop__s2")


# ---------------------------------------------------------------------------------------------
# A stem from another run, frozen; the forget gate set by the horizon (chrono)
# ---------------------------------------------------------------------------------------------
def test_init_stem_from_starts_every_agent_from_its_stem_and_a_frozen_one_does_not_move(tmp_path):
    """A tbptt run's MLP stem, loaded into two rtrl agents: frozen, it is bit for bit the file's at the end; not
    frozen, it moved. The chrono forget gate spreads b_f = log(u) over the units, u up to T_max - 1 = 99."""
    flags = ["--env-id", "memory_len/2", "--num-envs", "4", "--num-episodes", "32", "--stem", "mlp", "--save-model"]
    assert helpers.run_script(SCRIPT, tmp_path, *flags, "--core", "tbptt", "--run-name", "pre").returncode == 0
    pretrained = torch.load(tmp_path / "runs" / "pre" / "model.pt", weights_only=True)["model"]
    for frozen in (True, False):
        name = f"frozen{frozen}"
        more = ["--init-stem-from", "runs/pre/model.pt", "--num-seeds", "2", "--run-name", name, "--forget-init", "chrono"]
        proc = helpers.run_script(SCRIPT, tmp_path, *flags, *more, *(["--freeze-stem"] if frozen else []))
        assert proc.returncode == 0, proc.stderr
        for seed in (1, 2):
            model = torch.load(tmp_path / "runs" / f"{name}__s{seed}" / "model.pt", weights_only=True)["model"]
            same = [torch.equal(model[k], v) for k, v in pretrained.items() if k.startswith("stem.")]
            assert len(same) == 4 and all(same) == frozen and any(same) == frozen
            u = model["cell.b_f"].exp()  # trained a little from log(u), u ~ U(1, 99)
            assert u.min() > 0.5 and u.max() < 150 and u.std() > 10


def test_a_frozen_stem_gets_no_gradient_and_the_rest_gets_the_same():
    torch.manual_seed(0)
    agent = bs.Agent((3,), checks.NUM_ACTIONS, checks.HIDDEN, "rtrl", "mlp").double()
    (rollout,) = checks.random_rollouts(bs, 1, 5, 4, obs_kind=checks.Vector)
    returns = torch.randn(5, 4, dtype=torch.float64)
    grads = []
    for frozen in (False, True):
        agent.zero_grad(set_to_none=True)
        agent.stem.requires_grad_(not frozen)
        bs.compute_gradients(agent, rollout, returns, *agent.cell.initial_state(4), bs.Args())
        grads.append({k: p.grad for k, p in agent.named_parameters()})
    assert all(grads[1][k] is None for k in grads[1] if k.startswith("stem."))
    assert all(grads[0][k].norm() > 0 for k in grads[0] if k.startswith("stem."))
    for k, g in grads[1].items():
        if not k.startswith("stem."):
            assert torch.equal(g, grads[0][k]), k


@pytest.mark.parametrize(
    "file,message",
    [
        ("missing.pt", "No such file or directory"),
        (".", "Is a directory"),
        ("text.pt", "not a model.pt of this script"),
        ("no_stem.pt", "its stem does not fit: none for"),
        ("other_obs.pt", "its stem does not fit: {'0.weight': (256, 5)"),
    ],
)
def test_a_stem_that_cannot_be_loaded_is_a_one_line_error(tmp_path, monkeypatch, capsys, file, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.pt").write_text("not a model")
    torch.save({"model": bs.Agent((3,), 2, 8).state_dict()}, tmp_path / "no_stem.pt")
    torch.save({"model": bs.Agent((5,), 2, 8, stem="mlp").state_dict()}, tmp_path / "other_obs.pt")
    agent = bs.population([1, 2], (3,), 2, 8, "rtrl", "mlp")
    helpers.bad_input_in_process(
        lambda argv: bs.load_stem(agent, argv[0]), [file], f"--init-stem-from {file}: {message}", capsys
    )


@pytest.mark.parametrize("core", ["rtrl", "lstm"])
def test_chrono_sets_each_units_forget_bias_from_the_horizon(core):
    """b_f = log(u), u ~ U(1, T_max - 1), per unit and per agent; the LSTM's input gate gets -b_f and its hh biases of
    those gates 0, so that the gates' total biases are exactly these."""
    torch.manual_seed(0)
    agent = bs.Agent((3,), 2, 256, core, chrono_tmax=50)
    if core == "lstm":
        forget, input_gate = agent.cell.ih.bias[256:512], agent.cell.ih.bias[:256]
        assert torch.equal(input_gate, -forget) and (agent.cell.hh.bias[:512] == 0).all()
    else:
        forget = agent.cell.b_f
    u = forget.detach().exp()
    assert u.min() >= 1 - 1e-5 and u.max() <= 49 + 1e-4 and u.max() > 40 and u.min() < 3  # spread over 2..T_max
    population = bs.population([1, 2], (3,), 2, 256, core, "none", 3.0, 50)
    f = population.cell.ih.bias[:, 256:512] if core == "lstm" else population.cell.b_f
    assert not torch.equal(f[0], f[1])  # each agent its own draw
