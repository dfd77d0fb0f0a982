"""Claims every script must meet, each checked against an independent float64 computation.

Each check takes the script's module, so the scripts are held to the same references (written from
Method §1, §2 and §5 alone) while importing nothing from each other. tests/test_every_script.py states each
check once for every script it applies to (the update checks: the A2C scripts'); rtrl_impala_dmlab.py's own
tests reuse the references.
"""

import dataclasses
import glob
import inspect
import os

import torch
from helpers import episode_flags, rel_err, same_tensors
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PARAMS = ("w_z", "w_f", "v_z", "v_f", "b_z", "b_f")


# ---------------------------------------------------------------------------------------------
# The eLSTM and its RTRL
# ---------------------------------------------------------------------------------------------
def spec_cell(cell, x, c0, done):
    """Method §1 written out step by step, sharing no code with the scripts' ELSTM."""
    c, out = c0, []
    for t in range(x.shape[0]):
        c = c * (1.0 - done[t].double())[:, None]
        z = torch.tanh(x[t] @ cell.w_z.T + cell.v_z * c + cell.b_z)
        f = torch.sigmoid(x[t] @ cell.w_f.T + cell.v_f * c + cell.b_f)
        c = f * c + (1 - f) * z
        out.append(c)
    return torch.stack(out)


def make_cell(script, d=4, n=5, seed=0):
    torch.manual_seed(seed)
    return script.ELSTM(d, n).double()


def random_history(num_chunks, chunk_len, batch, d, n, seed=1):
    """x, done and dl_dc for several chunks; resets fall inside chunks, not only at their edges."""
    g = torch.Generator().manual_seed(seed)
    steps = num_chunks * chunk_len
    x = torch.randn(steps, batch, d, generator=g, dtype=torch.float64)
    done = torch.rand(steps, batch, generator=g) < 0.15
    done[steps // 2 + 1, 0] = True
    dl_dc = torch.randn(steps, batch, n, generator=g, dtype=torch.float64)
    return x, done, dl_dc


def check_forward_matches_spec(script):
    cell = make_cell(script)
    x, done, _ = random_history(1, 9, 3, 4, 5)
    c0 = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(cell(x, c0, done), spec_cell(cell, x, c0, done), rtol=1e-12, atol=1e-12)


def bptt_grads(cell, x, done, dl_dc):
    """Autograd through the whole history: the oracle RTRL must match."""
    c0 = torch.zeros(x.shape[1], cell.w_z.shape[0], dtype=torch.float64)
    loss = (dl_dc * spec_cell(cell, x, c0, done)).sum()
    return dict(zip(PARAMS, torch.autograd.grad(loss, [getattr(cell, k) for k in PARAMS])))


def check_rtrl_equals_bptt_across_chunks(script, impl, chunk_len):
    """RTRL chunk by chunk, carrying c and the sensitivities, equals BPTT through all chunks at once."""
    cell, num_chunks = make_cell(script), 4 if chunk_len > 1 else 12
    x, done, dl_dc = random_history(num_chunks, chunk_len, 3, 4, 5)
    expected = bptt_grads(cell, x, done, dl_dc)

    c, sens = cell.initial_state(3)
    total = {k: torch.zeros_like(getattr(cell, k)) for k in PARAMS}
    for i in range(num_chunks):
        chunk = slice(i * chunk_len, (i + 1) * chunk_len)
        grads, sens = cell.rtrl(x[chunk], c, done[chunk], sens, dl_dc[chunk], impl=impl)
        c = cell(x[chunk], c, done[chunk])[-1].detach()
        for k in PARAMS:
            total[k] += grads[k]
    for k in PARAMS:
        assert rel_err(total[k], expected[k]) < 1e-10, k


def check_carried_sensitivities_are_dc_dtheta(script):
    """Both impls' sens_T equal autograd's dc_T/dtheta, and are diagonal (unit n depends on row n only)."""
    cell = make_cell(script, d=2, n=3)
    x, done, dl_dc = random_history(1, 6, 2, 2, 3)
    c0 = torch.randn(2, 3, dtype=torch.float64)
    _, sens0 = cell.initial_state(2)
    sens0 = {k: torch.randn_like(s) for k, s in sens0.items()}  # as if carried from earlier chunks
    _, chunked = cell.rtrl(x, c0, done, sens0, dl_dc, impl="chunked")
    _, step = cell.rtrl(x, c0, done, sens0, dl_dc, impl="step")

    # Independent: dc_T/dtheta by autograd, c_0 depending on theta linearly with Jacobian sens0
    params = [getattr(cell, k) for k in PARAMS]
    c0_of_theta = c0 + sum(
        (sens0[k] * (p - p.detach())).sum(-1) if p.dim() == 2 else sens0[k] * (p - p.detach()) for k, p in zip(PARAMS, params)
    )
    c_T = spec_cell(cell, x, c0_of_theta, done)[-1]
    for b in range(2):
        for n in range(3):
            rows = torch.autograd.grad(c_T[b, n], params, retain_graph=True)
            for k, row in zip(PARAMS, rows):
                torch.testing.assert_close(chunked[k][b, n], row[n], rtol=1e-10, atol=1e-13)
                torch.testing.assert_close(step[k][b, n], row[n], rtol=1e-10, atol=1e-13)
                others = torch.cat([row[:n], row[n + 1 :]])
                assert others.abs().max() == 0, f"{k}: c_T[{n}] depends on other units' parameters"


def check_rtrl_scan_input_gradient_equals_autograd(script, impl):
    """rtrl_scan's dL/dx (within the chunk) equals autograd's through the cell; its gradients and carried
    sensitivities equal rtrl()'s."""
    cell = make_cell(script)
    x, done, dl_dc = random_history(1, 9, 3, 4, 5)
    c0 = torch.randn(3, 5, dtype=torch.float64)
    _, sens0 = cell.initial_state(3)
    sens0 = {k: torch.randn_like(s) for k, s in sens0.items()}
    x_leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad((dl_dc * spec_cell(cell, x_leaf, c0, done)).sum(), x_leaf)
    grads, sens_T, dl_dx = cell.rtrl_scan(x, cell.scan(x, c0, done), sens0, dl_dc, impl)
    assert rel_err(dl_dx, expected) < 1e-12
    grads_ref, sens_ref = cell.rtrl(x, c0, done, sens0, dl_dc, impl)
    for k in PARAMS:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(sens_T[k], sens_ref[k], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------
NUM_ACTIONS, HIDDEN = 3, 6


class Pixels:
    """uint8 images; the stem sees them scaled to [0, 1] (Method §5)."""

    shape = (2, 12, 12)

    @staticmethod
    def sample(steps, batch, g):
        return torch.randint(0, 256, (steps, batch, *Pixels.shape), generator=g, dtype=torch.uint8)

    @staticmethod
    def stem_features(agent, obs):
        return agent.stem(obs.flatten(0, 1).double() / 255).unflatten(0, obs.shape[:2])


class SymbolicView:
    """MiniGrid's 7x7 view of (object, colour, state) ids then the direction; the stem sees one-hots."""

    shape, sizes = (7 * 7 * 3 + 1,), (11, 6, 3)

    @staticmethod
    def sample(steps, batch, g):
        ids = [torch.randint(0, n, (steps, batch, 49, 1), generator=g) for n in SymbolicView.sizes]
        direction = torch.randint(0, 4, (steps, batch, 1), generator=g)
        return torch.cat([torch.cat(ids, -1).flatten(-2), direction], -1).to(torch.uint8)

    @staticmethod
    def stem_features(agent, obs):
        """One-hots by scatter, cell by cell, id by id: independent of the script's encoder."""
        hot = torch.zeros(*obs.shape[:2], 49 * 20 + 4, dtype=torch.float64)
        offsets = (0, 11, 17)
        for cell in range(49):
            for i, offset in enumerate(offsets):
                index = (cell * 20 + offset + obs[..., cell * 3 + i].long()).unsqueeze(-1)
                hot.scatter_(-1, index, 1.0)
        hot.scatter_(-1, (49 * 20 + obs[..., -1].long()).unsqueeze(-1), 1.0)
        return agent.stem(hot)


class Vector:
    """A small float vector the cell reads as it is (bsuite's, --stem none): the features are the observation."""

    shape = (3,)

    @staticmethod
    def sample(steps, batch, g):
        return torch.randn(steps, batch, *Vector.shape, generator=g, dtype=torch.float64)

    @staticmethod
    def stem_features(agent, obs):
        return obs.double()


class VectorMLP(Vector):
    """The same vector through a trainable stem (bsuite's --stem mlp)."""

    @staticmethod
    def stem_features(agent, obs):
        return agent.stem(obs.double())


def terminal_obs_steps(script):
    """Whether the script's episodes end with a step on the terminal observation (EnvPool's), marked `terminal_obs`;
    without one (bsuite's, reset at once), the step after a termination starts the next episode."""
    return "terminal_obs" in {f.name for f in dataclasses.fields(script.Rollout)}


def terminal_obs(r):
    """A rollout's terminal-observation flags (T x B), or None if its episodes have no such step."""
    return getattr(r, "terminal_obs", None)


def random_rollouts(script, num, steps, batch, seed=2, obs_kind=Pixels):
    g = torch.Generator().manual_seed(seed)
    if terminal_obs_steps(script):
        terms, terminal, firsts = episode_flags(num * steps, batch, g)
    else:
        terms = torch.rand(num * steps, batch, generator=g) < 0.25
        firsts = torch.cat([torch.ones(1, batch, dtype=torch.bool), terms[:-1]])
    rollouts = []
    for i in range(num):
        span = slice(i * steps, (i + 1) * steps)
        rollouts.append(
            script.Rollout(
                obs=obs_kind.sample(steps, batch, g),
                last_rewards=3 * torch.randn(steps, batch, generator=g, dtype=torch.float64),
                firsts=firsts[span],
                **({"terminal_obs": terminal[span]} if terminal_obs_steps(script) else {}),
                terms=terms[span],
                actions=torch.randint(0, NUM_ACTIONS, (steps, batch), generator=g),
                rewards=3 * torch.randn(steps, batch, generator=g, dtype=torch.float64),
                values=torch.randn(steps, batch, generator=g, dtype=torch.float64),
            )
        )
    return rollouts


def reference_returns(r, next_value, gamma):
    """Forward-looking sums, unlike the scripts' backward recursion."""
    steps, batch = r.rewards.shape
    out = torch.empty(steps, batch, dtype=torch.float64)
    for b in range(batch):
        for t in range(steps):
            g, discount = 0.0, 1.0
            for s in range(t, steps + 1):
                if s == steps:
                    g += discount * next_value[b]
                    break
                if terminal_obs(r) is not None and terminal_obs(r)[s, b]:  # a terminal observation: its value bootstraps
                    g += discount * r.values[s, b]
                    break
                g += discount * r.rewards[s, b].clamp(-1, 1)
                discount *= gamma
                if r.terms[s, b]:
                    break
            out[t, b] = g
    return out


def check_returns_bootstrap_truncations_and_cut_terminations(script):
    (r,) = random_rollouts(script, 1, 12, 4)
    ends = not terminal_obs_steps(script) or (r.terminal_obs[1:] & ~r.terms[:-1]).any()
    assert r.terms.any() and ends, "needs both kinds of end"
    next_value = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(script.n_step_returns(r, next_value, 0.9), reference_returns(r, next_value, 0.9))


def spec_lstm(lstm, x, state0, done):
    """A standard LSTM (i, f, g, o gates, h = o * tanh(c)) step by step; state is [h ; c], zeroed at resets."""
    if hasattr(lstm, "cell"):  # nn.LSTMCell
        w_ih, w_hh, bias = lstm.cell.weight_ih, lstm.cell.weight_hh, lstm.cell.bias_ih + lstm.cell.bias_hh
    else:  # bsuite's, written out with its population's Linear
        w_ih, w_hh, bias = lstm.ih.weight, lstm.hh.weight, lstm.ih.bias + lstm.hh.bias
    h, c = state0.chunk(2, -1)
    out = []
    for t in range(x.shape[0]):
        keep = (1.0 - done[t].double())[:, None]
        i, f, g, o = (x[t] @ w_ih.T + (h * keep) @ w_hh.T + bias).chunk(4, -1)
        c = torch.sigmoid(f) * c * keep + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out.append(torch.cat([h, c], -1))
    return torch.stack(out)


def reference_rollout_loss(agent, rollouts, returns, core, args, obs_kind=Pixels):
    """Loss of the last rollout as a function of all parameters, written from Method §1 and §5 alone.

    The recurrent state at the rollout's start depends on the cell's parameters through all earlier
    rollouts (rtrl), or is cut at the rollout's start (tbptt, lstm); the stem only sees the current
    rollout's observations.
    """
    width = 2 * HIDDEN if core == "lstm" else HIDDEN
    c = torch.zeros(rollouts[0].obs.shape[1], width, dtype=torch.float64)
    for j, r in enumerate(rollouts):
        x = torch.cat([obs_kind.stem_features(agent, r.obs), r.last_rewards.clamp(-1, 1)[..., None]], -1)
        current = j == len(rollouts) - 1
        x = x if current else x.detach()
        c = c.detach() if core in ("tbptt", "lstm") and current else c
        resets = torch.ones_like(r.firsts) if core == "ff" else r.firsts
        cs = spec_lstm(agent.cell, x, c, resets) if core == "lstm" else spec_cell(agent.cell, x, c, resets)
        c = cs[-1]
    h = cs[..., :HIDDEN] if core == "lstm" else torch.sigmoid(agent.gate(torch.cat([x, cs], -1))) * cs
    logp = torch.log_softmax(agent.actor(h), -1)
    value = agent.critic(h)[..., 0]
    live = torch.ones_like(returns) if terminal_obs(r) is None else (~terminal_obs(r)).double()
    adv = (returns - value).detach()
    pg = -(live * logp.gather(-1, r.actions[..., None])[..., 0] * adv).sum()
    ent = -(live * (logp.exp() * logp).sum(-1)).sum()
    return pg + args.vf_coef * 0.5 * (live * (returns - value) ** 2).sum() - args.ent_coef * ent


def script_grads(script, agent, rollouts, returns, args):
    """The script's update over consecutive rollouts with the carried c and sensitivities (no step). A script whose
    update takes the rollout's features (`x`) gets them as its rollout keeps them: step by step, with the stem's graph."""
    c, sens = agent.cell.initial_state(rollouts[0].obs.shape[1])
    takes_features = "x" in inspect.signature(script.compute_gradients).parameters
    for r in rollouts:
        agent.zero_grad(set_to_none=True)
        x = [torch.stack([agent.features(o, lr) for o, lr in zip(r.obs, r.last_rewards)])] if takes_features else []
        sens = script.compute_gradients(agent, r, *x, returns, c, sens, args)[1]
        with torch.no_grad():
            c = agent.cell(agent.features(r.obs, r.last_rewards), c, agent.resets(r.firsts))[-1]
    return {k: p.grad for k, p in agent.named_parameters()}


def check_update_gradients_equal_autograd(script, core, impl, obs_kind=Pixels, **agent_flags):
    """The whole update's gradient on every parameter, over 3 rollouts, equals autograd on the reference loss."""
    torch.manual_seed(0)
    agent = script.Agent(obs_kind.shape, NUM_ACTIONS, HIDDEN, core, **agent_flags).double()
    args = script.Args(core=core, **({"rtrl_impl": impl} if hasattr(script.Args, "rtrl_impl") else {}))
    rollouts = random_rollouts(script, 3, 5, 3, obs_kind=obs_kind)
    returns = torch.randn(5, 3, dtype=torch.float64)
    got = script_grads(script, agent, rollouts, returns, args)
    reference = lambda c: reference_rollout_loss(agent, rollouts, returns, c, args, obs_kind)
    assert_grads_equal_reference(agent, got, reference, core)


def assert_grads_equal_reference(agent, got, reference_loss, core):
    """`got` (name -> grad) equals autograd of reference_loss(core) on every parameter. For rtrl, the loss
    truncated at the rollout must give other eLSTM gradients, so that the check has teeth."""
    names, params = zip(*agent.named_parameters())
    expected = torch.autograd.grad(reference_loss(core), params, allow_unused=True)
    for name, e in zip(names, expected):
        e = torch.zeros_like(got[name]) if e is None else e
        assert rel_err(got[name], e) < 1e-10 if e.norm() > 0 else got[name].norm() == 0, name
    if core == "rtrl":
        truncated = torch.autograd.grad(reference_loss("tbptt"), agent.cell.w_z)
        assert rel_err(truncated[0], got["cell.w_z"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# What a run wrote
# ---------------------------------------------------------------------------------------------
UPDATE_SCALARS = (
    "charts/SPS",
    "charts/learning_rate",
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/grad_norm",
)


def read_scalars(run_dir):
    (event_file,) = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    acc = EventAccumulator(event_file, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_update_scalars(scalars, iterations):
    """One value per update for every update scalar, finite losses, a decaying learning rate."""
    for tag in UPDATE_SCALARS:
        assert len(scalars[tag]) == iterations, tag
    assert all(v == v and abs(v) < float("inf") for v in scalars["losses/value_loss"])
    assert scalars["charts/learning_rate"][0] > scalars["charts/learning_rate"][-1] > 0


def check_bad_input_is_a_one_line_error(proc, message, tmp_path):
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Greedy evaluation, and a stem loaded or frozen (the pixel A2C scripts)
# ---------------------------------------------------------------------------------------------
class FakeEvalEnvs:
    """Env i's episodes last lengths[i] steps; its k-th returns bases[i] + k / 100. So an env that ends its
    episodes fast with low returns is over-represented by any evaluation that keeps the first episodes to end."""

    def __init__(self, lengths, bases, obs_shape=Pixels.shape):
        n = len(lengths)
        self.lengths, self.bases, self.steps, self.ended = lengths, bases, [0] * n, [0] * n
        self.obs = torch.zeros(n, *obs_shape, dtype=torch.uint8)
        self.last_reward, self.first = torch.zeros(n), torch.ones(n, dtype=torch.bool)

    def step(self, action):
        assert action.shape == (len(self.lengths),)
        episodes = []
        for i, length in enumerate(self.lengths):
            self.steps[i] += 1
            if self.steps[i] == length:
                episodes.append((i, self.bases[i] + self.ended[i] / 100, length, self.ended[i]))
                self.steps[i], self.ended[i] = 0, self.ended[i] + 1
        return self.last_reward, torch.zeros(len(self.lengths), dtype=torch.bool), episodes


def check_greedy_evaluation_plays_a_fixed_quota_per_env(script):
    """Env i keeps its first num // n (+1 for i < num % n) episodes, however fast the others end theirs."""
    torch.manual_seed(0)
    agent = script.Agent(Pixels.shape, NUM_ACTIONS, HIDDEN)
    cases = [(6, [0, 0.01, 1, 1.01, 10, 10.01]), (5, [0, 0.01, 1, 1.01, 10]), (4, [0, 0.01, 1, 10]), (2, [0, 1])]
    for num, expected in cases:
        episodes = script.greedy_episodes(agent, FakeEvalEnvs([1, 3, 7], [0.0, 1.0, 10.0]), num)
        assert [round(e[0], 6) for e in episodes] == expected, (num, episodes)


def reachable_parameters(agent, tensor):
    """Names of the agent's parameters that a backward pass from `tensor` reaches (its graph's leaves)."""
    names = {id(p): name for name, p in agent.named_parameters()}
    found, seen, nodes = set(), set(), [tensor.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable") and id(node.variable) in names:
            found.add(names[id(node.variable)])
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return found


def backward_passes(agent, run):
    """run(), recording the parameters each backward pass it makes (Tensor.backward) reaches."""
    passes, original = [], torch.Tensor.backward

    def recording(tensor, *rest, **kwargs):
        passes.append(reachable_parameters(agent, tensor))
        return original(tensor, *rest, **kwargs)

    torch.Tensor.backward = recording
    try:
        run()
    finally:
        torch.Tensor.backward = original
    return passes


def check_frozen_stem_gets_nothing_and_the_rest_is_exact(script, core, impl):
    """--freeze-stem: no backward pass reaches the stem, and for rtrl none reaches the cell either (only the
    heads'); the stem gets no gradient and so no update; every other gradient equals the float64 reference."""
    torch.manual_seed(0)
    agent = script.Agent(Pixels.shape, NUM_ACTIONS, HIDDEN, core, freeze_stem=True).double()
    args = script.Args(core=core, freeze_stem=True, **({"rtrl_impl": impl} if hasattr(script.Args, "rtrl_impl") else {}))
    rollouts = random_rollouts(script, 3, 5, 3)
    returns = torch.randn(5, 3, dtype=torch.float64)
    stem_before = {k: v.clone() for k, v in agent.stem.state_dict().items()}
    got = {}
    passes = backward_passes(agent, lambda: got.update(script_grads(script, agent, rollouts, returns, args)))

    cell = {f"cell.{k}" for k, _ in agent.cell.named_parameters()}
    heads = {k for k, _ in agent.named_parameters() if not k.startswith(("stem.", "cell."))}
    assert len(passes) == len(rollouts), passes  # one per update: the loss's, no second one into the stem
    assert all(p <= (heads if core == "rtrl" else heads | cell) for p in passes), passes
    trained = [(k, p) for k, p in agent.named_parameters() if not k.startswith("stem.")]
    assert all(got[k] is None for k, _ in agent.stem.named_parameters(prefix="stem"))
    reference = reference_rollout_loss(agent, rollouts, returns, core, args)
    expected = torch.autograd.grad(reference, [p for _, p in trained])
    for (name, _), e in zip(trained, expected):
        assert rel_err(got[name], e) < 1e-10, name
    torch.optim.RMSprop(agent.parameters(), lr=1.0).step()  # every parameter offered: the stem's have no grad
    assert all(torch.equal(v, stem_before[k]) for k, v in agent.stem.state_dict().items())


INIT_STEM_ERRORS = {  # a file of each kind below, and what the one-line error says of it (rtrl_impala_dmlab.py's)
    "missing.pt": "no such file",
    ".": "a directory, not a file",  # a run directory given for its model.pt
    "text.pt": "not a checkpoint",
    "list.pt": "not a checkpoint",
    "other.pt": "written by other_script.py",
    "mlp.pt": "its stem does not fit",
    "shape.pt": "its stem does not fit",
}


def check_init_stem_from(script, tmp_path, capsys, obs_shape, other_obs_shape, errors=INIT_STEM_ERRORS):
    """--init-stem-from copies exactly the stem of a checkpoint written with another core; each file of `errors` (a
    missing file, a directory, a file that is not a checkpoint, another script's or another observation shape's) is
    a one-line error, exit 2, that names the flag and the file and says what `errors` says (case aside)."""
    torch.manual_seed(0)
    source = script.Agent(obs_shape, NUM_ACTIONS, HIDDEN, "tbptt")
    script.save_checkpoint(source, script.Args(core="tbptt"), str(tmp_path / "tbptt.pt"))
    agent = script.Agent(obs_shape, NUM_ACTIONS, HIDDEN, "rtrl")
    cell_before = {k: v.clone() for k, v in agent.cell.state_dict().items()}
    script.load_stem(agent, str(tmp_path / "tbptt.pt"))
    for k, v in source.stem.state_dict().items():
        assert torch.equal(agent.stem.state_dict()[k], v), k
    assert all(torch.equal(v, cell_before[k]) for k, v in agent.cell.state_dict().items())

    other_shape = script.Agent(other_obs_shape, NUM_ACTIONS, HIDDEN)
    script.save_checkpoint(other_shape, script.Args(), str(tmp_path / "shape.pt"))
    torch.save({"model": source.state_dict(), "args": {}, "script": "other_script.py"}, tmp_path / "other.pt")
    mlp_stem = {"stem.0.weight": torch.zeros(256, 984), "stem.0.bias": torch.zeros(256)}  # as MiniGrid's, no "script"
    torch.save({"model": mlp_stem, "args": {}}, tmp_path / "mlp.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    capsys.readouterr()
    for name, message in errors.items():
        try:
            script.load_stem(agent, str(tmp_path / name))
        except SystemExit as e:
            assert e.code == 2, name
        else:
            raise AssertionError(f"{name} was accepted")
        err = capsys.readouterr().err
        assert f"--init-stem-from {tmp_path / name}: " in err and len(err.strip().splitlines()) == 1, (name, err)
        assert message.lower() in err.lower(), (name, err)


# ---------------------------------------------------------------------------------------------
# Ready for a GPU: the float64 claim on cuda, checkpoints of CPU copies
# ---------------------------------------------------------------------------------------------
def check_rtrl_equals_bptt_on_cuda(script, impl):
    """check_rtrl_equals_bptt_across_chunks with RTRL on cuda (float64, TF32 off as the scripts set it): chunk by
    chunk, carrying c and the sensitivities, it equals BPTT through all chunks at once, computed on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cell = make_cell(script)
    x, done, dl_dc = random_history(4, 7, 3, 4, 5)
    expected = bptt_grads(cell, x, done, dl_dc)
    cell, x, done, dl_dc = (t.cuda() for t in (cell, x, done, dl_dc))
    c, sens = cell.initial_state(3)
    total = {k: 0.0 for k in PARAMS}
    for chunk in (slice(i * 7, (i + 1) * 7) for i in range(4)):
        grads, sens = cell.rtrl(x[chunk], c, done[chunk], sens, dl_dc[chunk], impl=impl)
        c = cell(x[chunk], c, done[chunk])[-1].detach()
        total = {k: total[k] + grads[k] for k in PARAMS}
    for k in PARAMS:
        assert total[k].is_cuda and rel_err(total[k].cpu(), expected[k]) < 1e-10, k


def all_tensors(obj):
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for v in obj for t in all_tensors(v)] if isinstance(obj, (list, tuple)) else []


def check_checkpoint_holds_cpu_copies(script, make_agent, tmp_path, monkeypatch):
    """No GPU here, so a tensor's .cpu() is marked instead: every tensor the script's save_checkpoint writes (model,
    optimizer state) must have come out of .cpu(), which on a GPU is the copy a CPU-only machine can load; the file
    loads with map_location="cpu" and resume() gives back the same bits."""
    agent = make_agent()
    optimizer = torch.optim.RMSprop(agent.parameters())
    sum(p.sum() for p in agent.parameters()).backward()
    optimizer.step()  # RMSprop's running averages: tensors in the optimizer state
    moved, written, cpu, save = set(), [], torch.Tensor.cpu, torch.save

    def marked_cpu(t, *a, **k):
        out = cpu(t, *a, **k).clone()
        moved.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "cpu", marked_cpu)
    monkeypatch.setattr(torch, "save", lambda obj, f: (written.append(obj), save(obj, f)))
    path = str(tmp_path / "checkpoint.pt")
    state = dict(optimizer=optimizer.state_dict(), run_name="r", iteration=1, global_step=10)
    script.save_checkpoint(agent, script.Args(), path, **state)
    tensors = all_tensors(written[0])
    assert len(tensors) > 2 * len(agent.state_dict()) and all(id(t) in moved for t in tensors)
    monkeypatch.undo()
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in all_tensors(loaded))
    again = make_agent()
    again_optimizer = torch.optim.RMSprop(again.parameters())
    script.resume(loaded, again, again_optimizer, script.Args(learning_rate=0.01, rms_alpha=0.99, rms_eps=1e-8))
    assert same_tensors(again.state_dict(), agent.state_dict())
    assert same_tensors(again_optimizer.state_dict(), optimizer.state_dict())


# ---------------------------------------------------------------------------------------------
# Populations (--num-seeds K): K agents in one process, each its single run (rtrl_a2c_bsuite.py, rtrl_a2c_popgym.py)
# ---------------------------------------------------------------------------------------------
def singles_and_population(script, core, seeds=(5, 6, 7), **agent_flags):
    """The population of `seeds` and, beside it, each seed's single agent as a single run makes it (float64)."""
    agent_args = inspect.signature(script.Agent).bind(Vector.shape, NUM_ACTIONS, HIDDEN, core, **agent_flags).args
    population = script.population(list(seeds), *agent_args).double()
    singles = []
    for seed in seeds:
        torch.manual_seed(seed)
        singles.append(script.Agent(*agent_args).double())
    return population, singles


def stacked(script, rollouts):
    """K agents' rollouts (T x B each) as the population's (T x K x B)."""
    fields = script.Rollout.__dataclass_fields__
    return script.Rollout(**{f: torch.stack([getattr(r, f) for r in rollouts], 1) for f in fields})


def two_updates_then_gradients(script, agent, rollouts, returns, args):
    """compute_gradients over consecutive rollouts with the carried c and sensitivities; the last one's .grad stays."""
    c, sens = agent.cell.initial_state(rollouts[0].obs.shape[-2])
    for r in rollouts:
        agent.zero_grad(set_to_none=True)
        sens = script.compute_gradients(agent, r, returns, c, sens, args)[1]
        with torch.no_grad():
            c = agent.cell(agent.features(r.obs, r.last_rewards), c, agent.resets(r.firsts))[-1]


def check_one_update_of_a_population_equals_its_agents_single_updates(script, core, **agent_flags):
    """3 agents, each with its own rollouts: the population's gradients (after 2 rollouts, so rtrl's carried
    sensitivities count), their clip and the RMSprop step equal each agent's single update, on every parameter.
    max_grad_norm lies between the agents' norms, so one agent is clipped and another is not."""
    population, singles = singles_and_population(script, core, forget_bias=2.0, **agent_flags)
    for k, single in enumerate(singles):  # agent k starts as the single run of its seed
        assert all(torch.equal(p[k], q) for p, q in zip(population.parameters(), single.parameters()))
    rollouts = [random_rollouts(script, 2, 5, 4, seed=10 + k, obs_kind=Vector) for k in range(3)]
    returns = [torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    args = script.Args(core=core)
    two_updates_then_gradients(
        script, population, [stacked(script, rs) for rs in zip(*rollouts)], torch.stack(returns, 1), args
    )
    norms = torch.stack([torch.cat([p.grad[k].flatten() for p in population.parameters()]).norm() for k in range(3)])
    max_norm = float(norms.sort().values[1] - 1e-3)  # the smallest norm stays, the others are clipped
    optimizer = torch.optim.RMSprop(population.parameters(), lr=0.1, alpha=0.9, eps=0.01)
    assert torch.allclose(script.clip_grad_norms_(list(population.parameters()), max_norm), norms, rtol=1e-12)
    optimizer.step()
    for k, single in enumerate(singles):
        two_updates_then_gradients(script, single, rollouts[k], returns[k], args)
        norm = torch.nn.utils.clip_grad_norm_(single.parameters(), max_norm)
        assert abs(norm - norms[k]) <= 1e-12 * norms[k] and (norm > max_norm) == (k != norms.argmin())
        grads = {name: p.grad.clone() for name, p in single.named_parameters()}
        torch.optim.RMSprop(single.parameters(), lr=0.1, alpha=0.9, eps=0.01).step()
        for name, p in population.named_parameters():  # (ff's v_z and v_f get no gradient: zeros on both sides)
            assert (p.grad[k] - grads[name]).norm() <= 1e-12 * grads[name].norm(), (k, name)
            assert rel_err(p[k], dict(single.named_parameters())[name]) < 1e-12, (k, name)


def check_an_agents_gradients_do_not_depend_on_the_other_agents_parameters(script, **agent_flags):
    population, _ = singles_and_population(script, "rtrl", **agent_flags)
    rollouts = [
        stacked(script, rs) for rs in zip(*[random_rollouts(script, 2, 5, 4, seed=k, obs_kind=Vector) for k in range(3)])
    ]
    returns = torch.randn(5, 3, 4, dtype=torch.float64)
    two_updates_then_gradients(script, population, rollouts, returns, script.Args())
    before = {name: p.grad.clone() for name, p in population.named_parameters()}
    with torch.no_grad():
        for p in population.parameters():
            p[1] += torch.randn_like(p[1])  # agent 1 moves
    two_updates_then_gradients(script, population, rollouts, returns, script.Args())
    for name, p in population.named_parameters():
        assert torch.equal(p.grad[0], before[name][0]) and torch.equal(p.grad[2], before[name][2]), name
        assert not torch.equal(p.grad[1], before[name][1]) or before[name][1].norm() == 0, name
