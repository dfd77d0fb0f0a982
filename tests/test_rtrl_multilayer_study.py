"""Claims about rtrl_multilayer_study.py, each checked against an independent float64 computation."""

import importlib.util
import json
import os
import re
import sys

import helpers
import numpy as np
import pytest
import torch
import tyro
from helpers import episode_flags, rel_err

import rtrl_multilayer_study as study

SCRIPT = study.__file__
BENCH = os.path.join(os.path.dirname(SCRIPT), "bench", "multilayer_cost.py")


# ---------------------------------------------------------------------------------------------
# Independent references: Method §1 and §4 written out step by step, and each method's definition
# ---------------------------------------------------------------------------------------------
def spec_stack(net, x, c0s, done, detach_above=None, cut_before=None):
    """h^L_1..T and the final c's, sharing no code with the script.

    detach_above=l: the layers above l read their own c_{t-1} detached at every step (rtrl-local's definition
    for layer l's parameters). cut_before=s: every layer's state is detached before step s (truncation).
    """
    cs, hs = list(c0s), []
    for t in range(x.shape[0]):
        inp = x[t]
        for l, (cell, gate) in enumerate(zip(net.stack.cells, net.stack.gates)):
            c = cs[l] * (1.0 - done[t].double())[:, None]
            if t == cut_before or (detach_above is not None and l > detach_above):
                c = c.detach()
            z = torch.tanh(inp @ cell.w_z.T + cell.v_z * c + cell.b_z)
            f = torch.sigmoid(inp @ cell.w_f.T + cell.v_f * c + cell.b_f)
            c = f * c + (1 - f) * z
            cs[l] = c
            inp = torch.sigmoid(torch.cat([inp, c], -1) @ gate.weight.T + gate.bias) * c
        hs.append(inp)
    return torch.stack(hs), cs


def groups(net):
    """Parameter names by layer: each layer's cell and gate, then the head."""
    names = [n for n, _ in net.named_parameters()]
    layers = [
        [n for n in names if n.startswith((f"stack.cells.{l}.", f"stack.gates.{l}."))] for l in range(len(net.stack.cells))
    ]
    return layers + [[n for n in names if n.startswith("head.")]]


def method_grads(net, method, loss_of, window_start):
    """The gradient each method defines, layer by layer, of loss_of(**spec_stack options).

    rtrl: through the whole history. rtrl-local: layer l's parameters with the layers above l detached through
    time. tbptt: every state cut before `window_start`. rtrl-top+tbptt: tbptt, but the top layer's whole history.
    The head is feed-forward: the same for all.
    """
    params = dict(net.named_parameters())
    *layers, head = groups(net)
    top = len(layers) - 1
    options = {
        "rtrl": lambda l: {},
        "rtrl-local": lambda l: {"detach_above": l},
        "tbptt": lambda l: {"cut_before": window_start},
        "rtrl-top+tbptt": lambda l: {} if l == top else {"cut_before": window_start},
    }[method]
    out = {}
    for names, kw in [(names, options(l)) for l, names in enumerate(layers)] + [(head, {})]:
        out.update(zip(names, torch.autograd.grad(loss_of(**kw), [params[n] for n in names])))
    return out


def assert_grads_equal(got, expected):
    for name, e in expected.items():
        assert not got[name].requires_grad, name
        assert rel_err(got[name], e) < 1e-10 if e.norm() > 0 else got[name].norm() == 0, name


def make_net(num_layers, d=3, n=4, out=2, seed=0):
    torch.manual_seed(seed)
    net = study.Net(d, n, num_layers, out).double()
    with torch.no_grad():  # nonzero biases everywhere, so no gradient vanishes by symmetry
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def random_history(steps, batch, d, out, seed=1):
    """x, done (resets inside chunks, not only at their edges) and the weights of a nonlinear loss on h^L."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, d, generator=g, dtype=torch.float64)
    done = torch.rand(steps, batch, generator=g) < 0.15
    done[steps // 2 + 1, 0] = True
    return x, done, torch.randn(steps, batch, out, generator=g, dtype=torch.float64)


def head_loss(net, h, w):
    return (w * torch.tanh(net.head(h))).sum()


def zero_states(net, batch):
    return [torch.zeros(batch, net.stack.cells[0].w_z.shape[0], dtype=torch.float64) for _ in net.stack.cells]


# ---------------------------------------------------------------------------------------------
# The stack and its RTRL
# ---------------------------------------------------------------------------------------------
def test_stack_forward_matches_spec_equations():
    net = make_net(3)
    x, done, _ = random_history(9, 2, 3, 2)
    c0s = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
    h, cs = net.stack(x, c0s, done)
    h_spec, cs_spec = spec_stack(net, x, c0s, done)
    torch.testing.assert_close(h, h_spec, rtol=1e-12, atol=1e-12)
    for c, c_spec in zip(cs, cs_spec):
        torch.testing.assert_close(c[-1], c_spec, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "num_layers,method,chunk_len",
    [
        (1, "rtrl", 5),
        (2, "rtrl", 5),
        (2, "rtrl", 1),
        (3, "rtrl", 5),
        (3, "rtrl", 1),
        (4, "rtrl", 5),  # the first depth where H^{m-1,l} passes through a gate (G_x @ H)
        (2, "rtrl-local", 5),
        (3, "rtrl-local", 1),
    ],
)
def test_rtrl_equals_its_definition_across_chunks_with_resets(num_layers, method, chunk_len):
    """Exact RTRL equals BPTT through the whole history for every parameter of every layer; rtrl-local equals
    autograd with the upper layers' memory detached. State and sensitivities are carried across chunks."""
    net, steps, batch = make_net(num_layers), 15, 2
    x, done, w = random_history(steps, batch, 3, 2)
    loss_of = lambda **kw: head_loss(net, spec_stack(net, x, zero_states(net, batch), done, **kw)[0], w)
    expected = method_grads(net, method, loss_of, None)

    c, sens = study.method_state(net.stack, batch, method)
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for start in range(0, steps, chunk_len):
        chunk = slice(start, start + chunk_len)
        chunk_loss = lambda h: head_loss(net, h, w[chunk])
        _, layers, sens = study.chunk_gradients(net, x[chunk], c, done[chunk], sens, chunk_loss, method)
        c = [layer.c[-1] for layer in layers]
        for n, p in net.named_parameters():
            total[n] += p.grad
    assert_grads_equal(total, expected)
    if num_layers > 1:  # the test has teeth: dropping the cross-layer memory changes layer 1's gradient
        other = "rtrl-local" if method == "rtrl" else "rtrl"
        alternative = method_grads(net, other, loss_of, None)
        assert rel_err(alternative["stack.cells.0.w_z"], expected["stack.cells.0.w_z"]) > 1e-3


def test_carried_cross_sensitivities_are_dc2_dtheta1():
    net, batch = make_net(2, d=2, n=3), 2
    x, done, w = random_history(6, batch, 2, 2)
    c, sens = study.method_state(net.stack, batch, "rtrl")
    _, _, sens = study.chunk_gradients(net, x, c, done, sens, lambda h: head_loss(net, h, w), "rtrl")

    params = [p for _, p in net.stack.layer_params(0)]
    c2_T = spec_stack(net, x, zero_states(net, batch), done)[1][1]
    for b in range(batch):
        for n in range(3):
            row = torch.cat([g.flatten() for g in torch.autograd.grad(c2_T[b, n], params, retain_graph=True)])
            torch.testing.assert_close(sens["cross"][1, 0][b, n], row, rtol=1e-10, atol=1e-13)
    assert sens["cross"][1, 0].abs().sum() > 0


@pytest.mark.parametrize("method", ["rtrl", "rtrl-local", "tbptt", "rtrl-top+tbptt"])
def test_online_learner_gives_each_tokens_gradient_as_its_method_defines(method):
    """Per token t, the learner's .grad is the method's gradient of that token's loss alone (tbptt: through
    its last k steps), with resets inside the window and the window sliding."""
    net, batch, k, steps = make_net(2), 2, 3, 8
    x, done, w = random_history(steps, batch, 3, 2, seed=4)
    learner = study.OnlineLearner(net, method, k, batch)
    for t in range(steps):
        learner.step(x[t], done[t], lambda h: head_loss(net, h, w[t : t + 1]))
        got = {n: p.grad.clone() for n, p in net.named_parameters()}
        h_of = lambda **kw: spec_stack(net, x[: t + 1], zero_states(net, batch), done[: t + 1], **kw)[0]
        loss_of = lambda **kw: head_loss(net, h_of(**kw)[-1:], w[t : t + 1])
        expected = method_grads(net, method, loss_of, window_start=max(0, t - k + 1))
        assert_grads_equal(got, expected)


def test_frozen_lower_trains_only_the_top_layer_and_the_head():
    args = study.parse_args(["--quick", "--copy-sequences", "2", "--copy-batch-size", "2"])
    torch.manual_seed(args.seed)
    before = study.Net(args.copy_bits + 1, args.copy_hidden_size, args.num_layers, args.copy_bits).state_dict()
    _, net = study.train_copy("frozen-lower", args.seed, args, torch.device("cpu"))
    top = f"stack.cells.{args.num_layers - 1}."
    for name, p in net.state_dict().items():
        frozen = name.startswith("stack.") and not name.startswith((top, f"stack.gates.{args.num_layers - 1}."))
        assert torch.equal(p, before[name]) == frozen, name


# ---------------------------------------------------------------------------------------------
# Copy task and RL
# ---------------------------------------------------------------------------------------------
def test_copy_stream_targets_every_pattern_bit_and_nothing_else():
    args = study.parse_args(["--copy-length", "3", "--copy-bits", "2", "--copy-batch-size", "4"])
    x, target, has_target, done = study.copy_stream(args, 2, torch.Generator().manual_seed(0), "cpu")
    K, T = 3, 7
    for s in range(2):
        seq = slice(s * T, (s + 1) * T)
        xs, ts, hs, ds = x[seq], target[seq], has_target[seq], done[seq]
        assert ds[0].all() and not ds[1:].any()
        assert hs.tolist() == [0] * (K + 1) + [1] * K
        torch.testing.assert_close(ts[K + 1 :], xs[:K, :, :2])  # recall step j asks for pattern j, all its bits
        assert (xs[:, :, 2] == torch.tensor([0, 0, 0, 1, 0, 0, 0])[:, None]).all()  # delimiter only at step K
        assert (xs[K + 1 :] == 0).all() and (ts[: K + 1] == 0).all()


def random_rollouts(num, steps, batch, obs_size, num_actions, seed=2):
    g = torch.Generator().manual_seed(seed)
    terms, terminal_obs, firsts = episode_flags(num * steps, batch, g)
    return [
        study.Rollout(
            obs=torch.randn(steps, batch, obs_size, generator=g, dtype=torch.float64),
            firsts=firsts[span],
            terminal_obs=terminal_obs[span],
            terms=terms[span],
            actions=torch.randint(0, num_actions, (steps, batch), generator=g),
            rewards=torch.randn(steps, batch, generator=g, dtype=torch.float64),
            values=torch.randn(steps, batch, generator=g, dtype=torch.float64),
        )
        for span in (slice(i * steps, (i + 1) * steps) for i in range(num))
    ]


def test_returns_bootstrap_truncations_and_cut_terminations():
    (r,) = random_rollouts(1, 12, 4, 2, 2)
    assert r.terms.any() and (r.terminal_obs[1:] & ~r.terms[:-1]).any(), "needs both kinds of episode end"
    next_value = torch.randn(4, dtype=torch.float64)
    expected = torch.empty(12, 4, dtype=torch.float64)
    for b in range(4):  # forward-looking sums, unlike the script's backward recursion
        for t in range(12):
            g, discount = 0.0, 1.0
            for s in range(t, 13):
                if s == 12 or r.terminal_obs[s, b]:  # the rollout's end or a terminal observation bootstraps
                    g += discount * (next_value[b] if s == 12 else r.values[s, b])
                    break
                g += discount * r.rewards[s, b]
                discount *= 0.9
                if r.terms[s, b]:
                    break
            expected[t, b] = g
    torch.testing.assert_close(study.n_step_returns(r, next_value, 0.9), expected)


@pytest.mark.parametrize("method", ["rtrl", "rtrl-local", "tbptt", "rtrl-top+tbptt"])
def test_rl_update_gradients_equal_autograd_through_the_history(method):
    """The last of consecutive rollouts (carried c and sensitivities): rtrl's gradients are BPTT through all of
    them, tbptt's are cut at the rollout's start, the others as method_grads defines."""
    net, num_actions, steps, batch = make_net(2, d=3, n=4, out=3 + 1), 3, 5, 3
    args = study.Args()
    rollouts = random_rollouts(3, steps, batch, 3, num_actions)
    returns = torch.randn(steps, batch, dtype=torch.float64)
    c, sens = study.method_state(net.stack, batch, method)
    for r in rollouts:
        loss_fn = lambda h: study.a2c_loss(net, h, r, returns, args)
        sens = study.chunk_gradients(net, r.obs, c, r.firsts, sens, loss_fn, method)[2]
        with torch.no_grad():
            c = [c_l[-1] for c_l in net.stack(r.obs, c, r.firsts)[1]]
    got = {n: p.grad for n, p in net.named_parameters()}

    def loss_of(**kw):
        obs, firsts = torch.cat([r.obs for r in rollouts]), torch.cat([r.firsts for r in rollouts])
        out = net.head(spec_stack(net, obs, zero_states(net, batch), firsts, **kw)[0][-steps:])
        logp, value, r = torch.log_softmax(out[..., :-1], -1), out[..., -1], rollouts[-1]
        live = (~r.terminal_obs).double()
        pg = -(live * logp.gather(-1, r.actions[..., None])[..., 0] * (returns - value).detach()).sum()
        entropy = -(live * (logp.exp() * logp).sum(-1)).sum()
        return pg + args.vf_coef * 0.5 * (live * (returns - value) ** 2).sum() - args.ent_coef * entropy

    assert_grads_equal(got, method_grads(net, method, loss_of, window_start=2 * steps))


def test_envs_mark_the_step_after_an_episode_end_terminal_obs_and_the_next_first():
    envs = study.Envs(study.env_seeds(0, 3), torch.device("cpu"))
    assert envs.obs.shape == (3, 2) and envs.first.all()  # positions only
    ends, g = 0, torch.Generator().manual_seed(0)
    for _ in range(200):
        was_terminal = envs.terminal_obs.clone()
        reward, term, episodes = envs.step(torch.randint(0, 2, (3,), generator=g))
        ends += len(episodes)
        assert (reward[was_terminal] == 0).all()  # the reset step: EnvPool ignores its action
        assert torch.equal(envs.first, was_terminal)
        assert not (envs.terminal_obs & was_terminal).any()
    envs.close()
    assert ends > 3 and all(r >= 1 for r in episodes)  # CartPole: reward 1 per step


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
def run_script(tmp_path, *flags):
    return helpers.run_script(SCRIPT, tmp_path, *flags)


TINY = [
    "--quick",
    "--copy-sequences",
    "3",
    "--copy-seeds",
    "1",
    "--copy-batch-size",
    "4",
    "--gradient-sequences",
    "1",
    "--rl-total-timesteps",
    "320",
    "--rl-seeds",
    "1",
    "--gradient-sweep-sequences",
    "1",
    "2",
    "--gradient-sweep-k",
    "1",
    "3",
    "8",
]


def test_quick_run_writes_the_whole_report(tmp_path):
    proc = run_script(tmp_path, *TINY, "--out-dir", "report")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "report"
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["copy"]["runs"]} == {*study.METHODS, "rtrl (L=1)"}
    assert all(len(r["accuracy"]) == 3 for r in results["copy"]["runs"])
    assert max(r["rel_error"] for r in results["gradients"]["init"] if r["method"] == "rtrl") < 1e-10
    assert {r["method"] for r in results["rl"]["runs"]} == {"rtrl", "rtrl-local", "tbptt", "rtrl (L=1)"}
    assert {r["layers"] for r in results["rl"]["runs"] if r["method"] == "rtrl (L=1)"} == {1}
    assert all(r["num_episodes"] > 0 and len(r["curve"]) == 20 for r in results["rl"]["runs"])
    sweeps = results["gradient_sweeps"]["rows"]
    assert {(r["sweep"], r["value"]) for r in sweeps} == {("sequences", 1), ("sequences", 2), ("k", 1), ("k", 3), ("k", 8)}
    # the state resets at every copy sequence (2K + 1 = 7 tokens here): a window that covers one is exact
    covering = [r for r in sweeps if r["sweep"] == "k" and r["value"] >= 7 and r["method"] == "tbptt"]
    assert covering and max(r["rel_error"] for r in covering) < 1e-10
    short = [r for r in sweeps if r["sweep"] == "k" and r["value"] < 4 and r["method"] == "tbptt" and r["group"] == "layer 1"]
    assert short and min(r["rel_error"] for r in short) > 1e-3
    report = (out / "report.md").read_text()
    for png in ("copy_accuracy.png", "gradient_quality.png", "rl_returns.png"):
        assert png in report and (out / png).stat().st_size > 1000
    # the tables hold the run's numbers: the copy table's rtrl row is its final accuracy
    (rtrl_copy,) = [r for r in results["copy"]["runs"] if r["method"] == "rtrl"]
    assert f"| rtrl | {rtrl_copy['final_accuracy']:.3f} | {rtrl_copy['final_accuracy']:.3f} |" in report
    assert not list(out.glob("*.tmp"))


def test_report_renders_from_results_json_alone(tmp_path):
    """The committed report is regenerated from its results.json (no experiment re-run): same text."""
    docs = os.path.join(os.path.dirname(SCRIPT), "docs", "multilayer_study")
    with open(os.path.join(docs, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(docs, "report.md")) as f:
        assert study.report_markdown(results) == f.read()


def test_quick_presets_only_the_flags_you_leave_out():
    assert study.parse_args(["--quick"]).tbptt_k == study.QUICK["tbptt_k"] != study.Args.tbptt_k
    assert study.parse_args(["--quick", "--tbptt-k", str(study.Args.tbptt_k)]).tbptt_k == study.Args.tbptt_k
    assert study.parse_args(["--tbptt-k", "2", "--quick"]).tbptt_k == 2
    assert study.parse_args(["--quick", "--no-quick"]).tbptt_k == study.Args.tbptt_k


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num-layers", "0"], "--num-layers must be positive, got 0"),
        (["--gradient-sweep-k", "8", "0"], "--gradient-sweep-k must be positive, got (8, 0)"),
        (["--ent-coef", "-0.1"], "--ent-coef must be at least 0, got -0.1"),
        (["--gamma", "1.5"], "--gamma must be at most 1"),
        (["--methods"], "--methods needs at least one value"),
        (["--rl-total-timesteps", "10"], "less than one rollout"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, flags, message, capsys):
    helpers.bad_input_in_process(study.parse_args, [*flags, "--out-dir", str(tmp_path / "report")], message, capsys)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    "flags,choice",
    [(["--methods", "rtrl", "bptt"], "bptt"), (["--studies", "cost"], "cost"), (["--rl-methods", "tbtt"], "tbtt")],
)
def test_an_unknown_method_or_study_is_tyros_error(flags, choice, capsys):
    with pytest.raises(SystemExit) as e:
        study.parse_args(flags)
    assert e.value.code == 2 and f"invalid choice '{choice}'" in capsys.readouterr().err


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = run_script(tmp_path, "--num-layers", "0", "--out-dir", "report")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--num-layers must be positive" in proc.stderr and not (tmp_path / "report").exists()


# ---------------------------------------------------------------------------------------------
# bench/multilayer_cost.py: the cost sweep over the study's learner
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, os.path.dirname(BENCH))  # the benchmark imports bench/common.py as `common`
    spec = importlib.util.spec_from_file_location("multilayer_cost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(os.path.dirname(BENCH))


def test_peak_memory_counts_live_storages_created_in_the_block(bench):
    outside = torch.zeros(100)
    with bench.PeakTensorMemory() as memory:
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.zeros(2000)  # 8000 bytes: peak 12000
        del a
        c = torch.zeros(500)  # 2000 bytes
        _ = b.view(10, 200), outside.t(), b.mul_(2)  # views and in-place results allocate nothing
    assert (memory.peak, memory.live) == (12000, 10000)
    del b, c


def test_exact_sensitivity_estimate_matches_the_carried_tensors(bench):
    stack = study.ELSTMStack(5, 5, 3)
    _, sens = stack.initial_state(2)
    assert bench.exact_sensitivity_bytes(3, 5, 2) == 4 * sum(s.numel() for s in sens["cross"].values())


def test_fit_exponent_recovers_a_power_law(bench):
    xs = np.array([8, 16, 32, 64])
    assert bench.fit_exponent(xs, 3.0 * xs**2.5) == pytest.approx(2.5)


def bench_table(stdout, title):
    """{(L, N): cells} of the table printed under `title`."""
    lines = stdout.splitlines()
    start = lines.index(title) + 3  # title, header, dashes
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[int(cells[0]), int(cells[1])] = cells[2:]
    return rows


def test_cost_bench_measures_every_method_side_by_side(tmp_path):
    figure = tmp_path / "cost.png"
    proc = helpers.run_script(BENCH, tmp_path, "--tiny", "--plot", str(figure))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("machine: ") and " cores, torch " in proc.stdout.splitlines()[0]
    by_n, by_l = bench_table(proc.stdout, "cost against N"), bench_table(proc.stdout, "cost against L")
    assert set(by_n) == {(L, n) for L in (1, 2) for n in (4, 6, 8)} and set(by_l) == {(1, 4), (3, 4)}
    for (L, n), cells in {**by_n, **by_l}.items():
        ms, mb = [float(c) for c in cells[:3]], [float(c) for c in cells[3:6]]
        assert all(t > 0 for t in ms) and all(m > 0 for m in mb)
        assert cells[6].endswith("x") and float(cells[6][:-1]) == pytest.approx(ms[0] / ms[1], rel=0.1, abs=0.06)
        # the cross sensitivities: exact RTRL holds B x N x P_l per upper layer, the others nothing like it
        assert (mb[0] > 3 * mb[1]) == (L > 1), (L, n, mb)
    fits = proc.stdout.split("growth in N")[1]
    assert len(re.findall(r"^\s*(rtrl|rtrl-local|tbptt)\s+\d", fits, re.M)) == 6
    assert f"figure saved to {figure}" in proc.stdout and figure.stat().st_size > 1000


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--hidden-sizes", "8", "0"], "must be positive"),
        (["--layers"], "need at least one value"),
        (["--plot", "/nonexistent/cost.png"], "no such directory"),
    ],
)
def test_cost_bench_bad_input_is_a_one_line_error(bench, flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: bench.check(tyro.cli(bench.Args, args=argv)), flags, message, capsys)
