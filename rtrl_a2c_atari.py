"""A2C with an element-wise LSTM trained by exact real-time recurrent learning (RTRL) on Atari.

Irie, Gopalakrishnan, Schmidhuber, "Exploring the Promise and Limits of Real-Time Recurrent Learning", ICLR 2024
(arXiv 2305.19044). The eLSTM's recurrence is diagonal, so its RTRL sensitivities cost O(B N D) per step, like its
input projection: the recurrent parameters get untruncated gradients from carried sensitivities, no stored history.

    python rtrl_a2c_atari.py --checkpoint-every 1000000         # --core tbptt | lstm | ff: the baselines
    python rtrl_a2c_atari.py --resume runs/<run>/checkpoint.pt  # goes on; flags given with it win
    python rtrl_a2c_atari.py --init-stem-from runs/<tbptt run>/model.pt --freeze-stem  # the paper's DMLab recipe
"""

import difflib
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    save_model: bool = False
    """whether to save the model and its args to `runs/{run_name}/model.pt`"""
    checkpoint_every: int = 0
    """agent steps between checkpoints to `runs/{run_name}/checkpoint.pt` (0: none; also at the end, and on Ctrl-C)"""
    resume: str = ""
    """a checkpoint.pt to continue, with its args as the defaults; every environment starts a new episode"""

    # Algorithm specific arguments
    env_id: str = "Breakout-v5"
    """the id of the EnvPool Atari environment"""
    total_timesteps: int = 10_000_000
    """total agent steps (each is 4 frames) over all environments"""
    num_envs: int = 16
    """the number of parallel game environments"""
    num_steps: int = 50
    """the rollout (= unroll) length; 1 updates after every environment step, fully online"""
    learning_rate: float = 6e-4
    """the learning rate of the optimizer"""
    anneal_lr: bool = True
    """linear learning-rate decay to 0"""
    rms_alpha: float = 0.99
    """RMSprop smoothing constant"""
    rms_eps: float = 0.01
    """RMSprop epsilon"""
    gamma: float = 0.99
    """the discount factor"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value (baseline) loss"""
    max_grad_norm: float = 40.0
    """the maximum global norm of the gradients"""
    hidden_size: int = 256
    """N, the size of the recurrent state (eLSTM c; for lstm, h and c each)"""
    core: Literal["rtrl", "tbptt", "lstm", "ff"] = "rtrl"
    """rtrl: eLSTM, exact RTRL; tbptt: eLSTM, BPTT cut at each rollout; lstm: nn.LSTMCell, cut alike; ff: no memory"""
    eval_episodes: int = 10
    """greedy evaluation games (all lives) after training, on min(this, num_envs) fresh envs (0: none)"""
    init_stem_from: str = ""
    """a model.pt or checkpoint.pt of this script (any core): start from its stem (`stem.*`); the rest starts fresh"""
    freeze_stem: bool = False
    """the stem gets no gradient, so rtrl backpropagates through no time step (without --init-stem-from: random)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


class AtariEnvs:
    """EnvPool Atari (Method §5). EnvPool answers the step after an episode's end with the next episode's first
    observation, ignoring its action: the observation before is `terminal_obs` (no loss, its value bootstraps a
    truncation), the next one `first` (state and sensitivities reset). Episodes are lives; statistics count games."""

    def __init__(self, env_id, seeds, device):
        # EnvPool's defaults are the paper's preprocessing but for episodic life (84x84 gray, frame skip 4, stack 4, ...)
        self.envs = envpool.make(env_id, env_type="gymnasium", num_envs=len(seeds), env_seed=seeds, episodic_life=True)
        self.close = self.envs.close
        self.device, n = device, len(seeds)
        self.obs = torch.as_tensor(self.envs.reset()[0], device=device)
        self.last_reward, self.game_return = torch.zeros(n, device=device), np.zeros(n)
        self.first = torch.ones(n, dtype=torch.bool, device=device)
        self.terminal_obs = torch.zeros(n, dtype=torch.bool, device=device)

    def step(self, action):
        """Returns (reward, terminated) of the step and the (env, return, length) of real games that ended."""
        obs, reward, term, trunc, info = self.envs.step(action.cpu().numpy())
        self.game_return += reward
        ended = np.flatnonzero(info["terminated"].astype(bool) | trunc)  # real games: no life left, or the time limit
        games = [(int(i), self.game_return[i], int(info["elapsed_step"][i])) for i in ended]
        self.game_return[ended] = 0.0
        self.first = self.terminal_obs  # the step after a terminal observation returns a new episode's first one
        self.terminal_obs = torch.as_tensor(term | trunc, device=self.device)
        self.obs = torch.as_tensor(obs, device=self.device)
        self.last_reward = torch.as_tensor(reward, dtype=torch.float32, device=self.device)
        return self.last_reward, torch.as_tensor(term, device=self.device), games


# ---------------------------------------------------------------------------------------------
# The element-wise LSTM and its exact RTRL (Method §1-3)
# ---------------------------------------------------------------------------------------------
class ELSTM(nn.Module):
    """c_t = f_t * c_{t-1} + (1 - f_t) * z_t, with z, f reading c_{t-1} only element-wise (Method §1).

    The output gate lives outside (Agent.heads): it is feed-forward and needs no sensitivities.
    num_agents=K: an agent dim leads every parameter and precedes the batch dim (x: T x K x B x D), agent by agent.
    """

    MATRICES = ("w_z", "w_f")  # sensitivities B x N x D; the rest are vectors, B x N

    def __init__(self, input_size, hidden_size, num_agents=None):
        super().__init__()
        n, d, k = hidden_size, input_size, () if num_agents is None else (num_agents,)
        self.w_z, self.w_f = (nn.Parameter(0.1 * torch.randn(*k, n, d)) for _ in range(2))
        self.v_z, self.v_f, self.b_z, self.b_f = (nn.Parameter(0.1 * torch.randn(*k, n)) for _ in range(4))

    def initial_state(self, batch_size):
        """(c, sens): zero state and zero sensitivities dc/dtheta, one B x shape(theta) tensor per parameter."""
        k = self.b_z.shape[:-1]  # a population's agent dim, or none
        sens = {name: q.new_zeros(*k, batch_size, *q.shape[len(k) :]) for name, q in self.named_parameters()}
        return self.b_z.new_zeros(*k, batch_size, self.b_z.shape[-1]), sens

    def _scan(self, x, c0, done):
        """The recurrence over T steps; x: T x B x D, c0: B x N, done: T x B (reset before step t)."""
        pre_z = torch.matmul(x, self.w_z.mT) + self.b_z.unsqueeze(-2)  # all steps' input projections in one GEMM
        pre_f = torch.matmul(x, self.w_f.mT) + self.b_f.unsqueeze(-2)
        v_z, v_f = self.v_z.unsqueeze(-2), self.v_f.unsqueeze(-2)
        notdone = (~done.bool()).unsqueeze(-1).to(x.dtype)
        c, cs, c_prevs, zs, fs = c0, [], [], [], []
        # unbind, not pre_z[t]: backprop then assembles one T x B x N gradient, not one per step
        for pre_z_t, pre_f_t, notdone_t in zip(pre_z.unbind(), pre_f.unbind(), notdone.unbind()):
            c_prev = c * notdone_t
            z = torch.tanh(torch.addcmul(pre_z_t, v_z, c_prev))
            f = torch.sigmoid(torch.addcmul(pre_f_t, v_f, c_prev))
            c = torch.lerp(z, c_prev, f)  # f * c_prev + (1 - f) * z, in one op
            cs.append(c), c_prevs.append(c_prev), zs.append(z), fs.append(f)
        return cs, c_prevs, zs, fs, notdone  # lists of B x N tensors: callers stack what they need

    def forward(self, x, c0, done):
        """c_1..c_T (T x B x N), differentiable by autograd."""
        return torch.stack(self._scan(x, c0, done)[0])

    @torch.no_grad()
    def scan(self, x, c0, done):
        """The forward pass without autograd, kept for rtrl_scan: (c_1..c_T, c_prev, z, f, notdone), stacked."""
        return tuple(torch.stack(v) if isinstance(v, list) else v for v in self._scan(x, c0, done))

    def rtrl(self, x, c0, done, sens, dl_dc, impl="chunked"):
        """Exact gradients of sum_t <dl_dc[t], c_t> through the whole history, and the sensitivities at T.

        `sens` are dc_0/dtheta carried from earlier chunks; dl_dc[t] is the local dL/dc_t (Method §2).
        """
        return self.rtrl_scan(x, self.scan(x, c0, done), sens, dl_dc, impl)[:2]

    @torch.no_grad()
    def rtrl_scan(self, x, scan, sens, dl_dc, impl="chunked", overwrite=False):
        """rtrl() from a scan() already made, plus dL/dx_t within the chunk: (grads, sens_T, dl_dx).

        R_t below is the within-chunk dL/dc_t, so dL/dx_t = W_z^T (alpha_t R_t) + W_f^T (beta_t R_t):
        the update gets the stem's gradient through the cell without an autograd pass over it.
        overwrite=True lets the chunked pass update the B x N x D tensors of `sens` in place (they
        become sens_T's): no new tensor of that size and one pass fewer over it. The caller gives them up.
        """
        _, c_prev, z, f, notdone = scan
        # u = (alpha_t, beta_t), T x B x 2 x N: the increments of W_z's and W_f's sensitivities (times x_t)
        # and of b_z's and b_f's; v_z's and v_f's are these times c_{t-1}. One tensor, so that W_z and W_f
        # share every GEMM below.
        u = c_prev.new_empty(*c_prev.shape[:-1], 2, c_prev.shape[-1])
        alpha, beta = u.unbind(-2)
        one_minus_f = 1 - f
        torch.addcmul(f.new_ones(()), z, z, value=-1, out=alpha).mul_(one_minus_f)  # dc_t / d pre-activation of z
        torch.sub(c_prev, z, out=beta).mul_(f).mul_(one_minus_f)  # dc_t / d pre-activation of f
        a = torch.addcmul(f, alpha, self.v_z.unsqueeze(-2)).addcmul_(beta, self.v_f.unsqueeze(-2)).mul_(notdone)  # J_t
        # R_s = delta_s + a_{s+1} R_{s+1}: what step s's sensitivity is worth to the chunk's loss;
        # P_s = a_{s+1} P_{s+1}: how much of step s's increment survives to T
        R, P = torch.empty_like(dl_dc), torch.empty_like(a)
        R[-1], P[-1] = dl_dc[-1], 1.0
        for t in range(len(a) - 2, -1, -1):
            torch.addcmul(dl_dc[t], a[t + 1], R[t + 1], out=R[t])
            torch.mul(a[t + 1], P[t + 1], out=P[t])
        uR = u * R.unsqueeze(-2)  # (alpha_t R_t, beta_t R_t)
        if impl == "chunked":
            grads, sens_T = self._rtrl_chunked(x, c_prev, a, u, uR, R, P, sens, overwrite)
        else:
            grads, sens_T = self._rtrl_step(x, c_prev, a, u, sens, dl_dc)
        dl_dx = torch.matmul(uR.flatten(-2), torch.cat([self.w_z, self.w_f], -2))
        return grads, sens_T, dl_dx

    def _rtrl_step(self, x, c_prev, a, u, sens, dl_dc):
        """Method §2: S_t = J_t * S_{t-1} + u_t (x) x_t;  grad += sum_b delta_t * S_t."""
        alpha, beta = u.unbind(-2)
        u = {"w_z": alpha, "w_f": beta, "v_z": alpha * c_prev, "v_f": beta * c_prev, "b_z": alpha, "b_f": beta}
        grads = {k: torch.zeros_like(p) for k, p in self.named_parameters()}
        sens = dict(sens)
        for t in range(x.shape[0]):
            for k in grads:
                if k in self.MATRICES:
                    sens[k] = a[t, ..., None] * sens[k] + u[k][t, ..., None] * x[t, ..., None, :]
                    grads[k] += torch.einsum("...bn,...bnd->...nd", dl_dc[t], sens[k])
                else:
                    sens[k] = a[t] * sens[k] + u[k][t]
                    grads[k] += (dl_dc[t] * sens[k]).sum(-2)
        return grads, sens

    def _rtrl_chunked(self, x, c_prev, a, u, uR, R, P, sens, overwrite):
        """Method §3: the same numbers, reading S_0 once and turning the rest into matrix products."""
        T, N = u.shape[0], u.shape[-1]
        aR0, aP0 = a[0] * R[0], a[0] * P[0]
        # (alpha_t P_t, beta_t P_t), stored B x T x 2 x N: each batch row's N x T factor of S_T is a plain matrix
        uP = torch.mul(u, P.unsqueeze(-2), out=u.new_empty(*u.shape[1:-2], T, 2, N).movedim(-3, 0)).movedim(0, -3)
        # the chunk's own terms: sum_{t,b} (u_t R_t) x_t^T for W_z and W_f in one GEMM (2N x D), and the vectors'
        rows = lambda y: y.movedim(0, -3).flatten(-3, -2)  # T x B x F -> TB x F, agent by agent
        w = torch.matmul(rows(uR.flatten(-2)).mT, rows(x))
        b, v = uR.sum((0, -3)), (uR * c_prev.unsqueeze(-2)).sum((0, -3))  # 2 x N: (b_z, b_f), (v_z, v_f)
        sb, sv = uP.sum(-3), (uP * c_prev.movedim(0, -2).unsqueeze(-2)).sum(-3)  # B x 2 x N, for S_T
        chunk = {
            "w_z": (w[..., :N, :], uP[..., 0, :]),
            "w_f": (w[..., N:, :], uP[..., 1, :]),
            "v_z": (v[..., 0, :], sv[..., 0, :]),
            "v_f": (v[..., 1, :], sv[..., 1, :]),
            "b_z": (b[..., 0, :], sb[..., 0, :]),
            "b_f": (b[..., 1, :], sb[..., 1, :]),
        }
        # N x 1 x B, contiguous: then sum_b (a_1 R_1) * S_0 is one batched GEMM that reads S_0 where it lies
        aR0_n1b = aR0.mT.contiguous().unsqueeze(-2)
        x_bt = x.movedim(0, -2).flatten(0, -3)  # B x T x D (an agent's batch rows after another's)
        grads, sens_T = {}, {}
        for k, s0 in sens.items():
            g, s = chunk[k]
            if k in self.MATRICES:
                grads[k] = torch.matmul(aR0_n1b, s0.transpose(-3, -2)).squeeze(-2).add_(g)
                sens_T[k] = s0.mul_(aP0[..., None]) if overwrite else s0 * aP0[..., None]
                sens_T[k].flatten(0, -3).baddbmm_(s.flatten(0, -3).mT, x_bt)  # + sum_t (u_t P_t) x_t^T, row by row
            else:
                grads[k] = (aR0 * s0).sum(-2).add_(g)
                sens_T[k] = torch.addcmul(s, aP0, s0)
        return grads, sens_T


class LSTM(nn.Module):
    """The conventional baseline (`--core lstm`): a standard LSTM, its state [h ; c] kept as one B x 2N
    tensor so that it travels through the loop like the eLSTM's c, reset where `done` is set."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)

    def initial_state(self, batch_size):
        return self.cell.weight_hh.new_zeros(batch_size, 2 * self.cell.hidden_size), {}

    def forward(self, x, state0, done):
        notdone = (~done.bool()).unsqueeze(-1).to(x.dtype)
        state, states = state0, []
        for x_t, notdone_t in zip(x.unbind(), notdone.unbind()):
            h, c = (state * notdone_t).chunk(2, -1)
            state = torch.cat(self.cell(x_t, (h, c)), -1)
            states.append(state)
        return torch.stack(states)


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


def conv_sequence(in_channels, out_channels):
    conv, pool = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Sequential(conv, pool, ResidualBlock(out_channels), ResidualBlock(out_channels))


class Agent(nn.Module):
    """Method §5: IMPALA ResNet stem -> [features ; clipped last reward] -> eLSTM (or LSTM) -> heads."""

    def __init__(self, obs_shape, num_actions, hidden_size, core="rtrl", freeze_stem=False):
        super().__init__()
        self.core = core
        convs = nn.Sequential(conv_sequence(obs_shape[0], 16), conv_sequence(16, 32), conv_sequence(32, 32))
        with torch.no_grad():
            flat = convs(torch.zeros(1, *obs_shape)).numel()
        # the stem: everything before the cell that has parameters (--init-stem-from, --freeze-stem)
        self.stem = nn.Sequential(convs, nn.ReLU(), nn.Flatten(), nn.Linear(flat, 256), nn.ReLU())
        self.stem.to(memory_format=torch.channels_last)  # NHWC: CPU (oneDNN) convolutions run ~1.6x faster
        self.stem.requires_grad_(not freeze_stem)  # frozen: its output has no graph, so nothing flows back into it
        self.cell = LSTM(256 + 1, hidden_size) if core == "lstm" else ELSTM(256 + 1, hidden_size)
        self.gate = None if core == "lstm" else nn.Linear(256 + 1 + hidden_size, hidden_size)  # Method §1's output gate
        self.actor = nn.Linear(hidden_size, num_actions)
        self.critic = nn.Linear(hidden_size, 1)

    def features(self, obs, last_reward):
        """x = [stem(obs) ; clip(last reward)], for any leading dims of obs (... x C x H x W)."""
        lead = obs.shape[:-3]
        y = self.stem(obs.reshape(-1, *obs.shape[-3:]).to(self.critic.weight.dtype) / 255.0)
        return torch.cat([y.reshape(*lead, -1), last_reward.clamp(-1, 1).unsqueeze(-1).to(y.dtype)], -1)

    def resets(self, first):
        """The cell's done mask: episode starts, or every step for the memoryless `ff` core."""
        return torch.ones_like(first) if self.core == "ff" else first

    def heads(self, x, c):
        if self.core == "lstm":
            h = c[..., : self.actor.in_features]  # the LSTM's own output h_t
        else:
            h = torch.sigmoid(self.gate(torch.cat([x, c], -1))) * c  # output gate conditioned on c_t (Method §1)
        return self.actor(h), self.critic(h).squeeze(-1)

    @torch.no_grad()
    def act(self, x, c, first, greedy=False):
        """One environment step of the policy from the step's features x: (action, value, next c)."""
        c = self.cell(x[None], c, self.resets(first)[None])[0]
        logits, value = self.heads(x, c)
        action = logits.argmax(-1) if greedy else torch.distributions.Categorical(logits=logits).sample()
        return action, value, c


@dataclass
class Rollout:
    """What one rollout of T steps x B envs keeps for the update (the CleanRL storage)."""

    obs: torch.Tensor  # T x B x 4 x 84 x 84, uint8
    last_rewards: torch.Tensor  # T x B, the reward input of each step
    firsts: torch.Tensor  # T x B, reset state and sensitivities before the step
    terminal_obs: torch.Tensor  # T x B, the observation is terminal: no loss, its value bootstraps
    actions: torch.Tensor  # T x B
    rewards: torch.Tensor  # T x B
    terms: torch.Tensor  # T x B, the step ended its episode (no bootstrap)
    values: torch.Tensor  # T x B


def n_step_returns(rollout, next_value, gamma):
    """G_t = clip(r_t) + gamma G_{t+1}, cut by terminations; a terminal observation's G is its value (Method §6)."""
    returns, g = torch.empty_like(rollout.values), next_value
    for t in reversed(range(len(returns))):
        g = rollout.rewards[t].clamp(-1, 1) + torch.where(rollout.terms[t], 0.0, gamma * g)
        g = torch.where(rollout.terminal_obs[t], rollout.values[t], g)
        returns[t] = g
    return returns


def rollout_loss(agent, rollout, returns, x, c, args):
    """The A2C loss summed over time and batch (Method §5), and its parts for logging."""
    logits, value = agent.heads(x, c)
    dist = torch.distributions.Categorical(logits=logits)
    live = (~rollout.terminal_obs).to(value.dtype)
    pg_loss = -(live * dist.log_prob(rollout.actions) * (returns - value).detach()).sum()  # advantages: no gradient
    v_loss = 0.5 * (live * (returns - value) ** 2).sum()
    entropy = (live * dist.entropy()).sum()
    loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy
    return loss, {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.item()}


def compute_gradients(agent, rollout, x, returns, c0, sens0, args):
    """Fill every parameter's .grad for one rollout's loss; return (stats, sens_T).

    x: the features with the stem's graphs as the rollout kept them (on the CPU faster than a second forward). rtrl: exact
    RTRL for the eLSTM and, from the same pass (rtrl_scan), the stem's gradient through the cell (Method §5); else autograd.
    """
    resets = agent.resets(rollout.firsts)
    x_leaf = x.detach().requires_grad_()
    sens_T = sens0
    if args.core == "rtrl":
        scan = agent.cell.scan(x_leaf.detach(), c0, resets)
        c_leaf = scan[0].requires_grad_()  # its grad is the local delta_t = dL/dc_t (Method §2)
        loss, stats = rollout_loss(agent, rollout, returns, x_leaf, c_leaf, args)
        loss.backward()
        # sens0 is not used again: its B x N x D tensors become sens_T's
        grads, sens_T, dl_dx = agent.cell.rtrl_scan(x_leaf.detach(), scan, sens0, c_leaf.grad, overwrite=True)
        for name, p in agent.cell.named_parameters():
            p.grad = grads[name]
        dl_dx += x_leaf.grad
    else:
        loss, stats = rollout_loss(agent, rollout, returns, x_leaf, agent.cell(x_leaf, c0, resets), args)
        loss.backward()
        dl_dx = x_leaf.grad
    if x.requires_grad:  # a stem that trains: its gradient through the cell, within the rollout
        x.backward(dl_dx)
    return stats, sens_T


@torch.no_grad()
def greedy_episodes(agent, envs, num_episodes):
    """Greedy play until env i of n has ended its quota (num_episodes // n, +1 for i < num_episodes % n), fixed before
    play so that short episodes do not crowd out long ones; each episode's tuple without the env, env by env."""
    n = len(envs.first)
    quotas = [num_episodes // n + (i < num_episodes % n) for i in range(n)]
    c, finished = agent.cell.initial_state(n)[0], [[] for _ in range(n)]
    while any(len(episodes) < quota for episodes, quota in zip(finished, quotas)):
        action, _, c = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first, greedy=True)
        for i, *episode in envs.step(action)[2]:
            if len(finished[i]) < quotas[i]:
                finished[i].append(tuple(episode))
    return [episode for episodes in finished for episode in episodes]


# ---------------------------------------------------------------------------------------------
# Infrastructure: argument checks, seeds, the device, a stem from a file, checkpoints, the progress line
# ---------------------------------------------------------------------------------------------
def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def one_line(e):
    """An exception's message in one line: its first two (load_state_dict's then name the first mismatch)."""
    return " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__


def check_args(args):
    """Only what would otherwise run silently wrong; tyro, torch and EnvPool report the rest."""
    if args.total_timesteps < args.num_envs * args.num_steps:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout ({args.num_envs} envs x {args.num_steps})")
    if not (args.learning_rate > 0 and args.max_grad_norm > 0):  # clip_grad_norm_ would flip the gradient's sign
        fail(f"--learning-rate and --max-grad-norm must be positive, got {args.learning_rate}, {args.max_grad_norm}")
    if not (args.rms_eps >= 0 and 0 <= args.rms_alpha <= 1 and 0 <= args.gamma <= 1):  # would run, wrongly
        fail(f"--rms-eps must be >= 0, --rms-alpha and --gamma in [0, 1], got {args.rms_eps}, {args.rms_alpha}, {args.gamma}")
    ids = sorted(k for k, v in envpool.registration.registry.specs.items() if v[0] == "envpool.atari")
    if args.env_id not in ids:
        close = difflib.get_close_matches(args.env_id, ids, n=3, cutoff=0.5)
        fail(f"unknown Atari env id {args.env_id!r}; " + (f"did you mean {', '.join(close)}?" if close else f"e.g. {ids[0]}"))


def env_seeds(seed, n):
    """Distinct per-env seeds derived from --seed (Method §6)."""
    return np.random.default_rng(seed).choice(2**31 - 1, size=n, replace=False).tolist()  # Python ints, for EnvPool


def pick_device(args):
    """The device and the line that names it, printed and logged at start: a fallback to the CPU is never silent."""
    if not (args.cuda and torch.cuda.is_available()):
        return torch.device("cpu"), "device: cpu (--cuda: no CUDA device found)" if args.cuda else "device: cpu"
    return torch.device("cuda:0"), f"device: cuda:0 ({torch.cuda.get_device_name('cuda:0')}, torch CUDA {torch.version.cuda})"


def load_stem(agent, path):
    """--init-stem-from: every `stem.*` parameter of a model.pt or checkpoint.pt of this script (any core)."""
    try:
        model = torch.load(path, map_location="cpu", weights_only=True)["model"]
        agent.stem.load_state_dict({k.removeprefix("stem."): v for k, v in model.items() if k.startswith("stem.")})
    except Exception as e:  # no such file, not a checkpoint, a stem of another observation shape
        fail(f"--init-stem-from {path}: {one_line(e)}")


def save_checkpoint(agent, args, path, **state):
    """Atomic (a temp file, then a rename), of CPU copies (a GPU's loads on a CPU); with `state`, one to --resume from."""
    cpu = lambda x: {k: cpu(v) for k, v in x.items()} if isinstance(x, dict) else x.cpu() if torch.is_tensor(x) else x
    checkpoint = {"script": os.path.basename(__file__), "model": agent.state_dict(), "args": vars(args), **state}
    torch.save(cpu(checkpoint), f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def parse_args(argv=None):
    """(args, checkpoint): with --resume, the checkpoint's args are the defaults and the flags given win."""
    args = tyro.cli(Args, args=argv)
    try:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
        if checkpoint is not None and "optimizer" not in checkpoint:
            raise ValueError("a model.pt holds the weights only: resume from a checkpoint.pt")
        return (tyro.cli(Args, args=argv, default=Args(**checkpoint["args"])) if checkpoint else args), checkpoint
    except Exception as e:  # no such file, not a checkpoint, another script's
        fail(f"--resume {args.resume}: {one_line(e)}")


def resume(checkpoint, agent, optimizer, args):
    """The model and the optimizer from the checkpoint (flags given win); RNGs reseeded from (seed, step)."""
    try:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except Exception as e:  # another agent's shapes (--hidden-size, another game), a model.pt
        fail(f"--resume {args.resume}: the checkpoint does not fit: {one_line(e)}")
    optimizer.param_groups[0].update(lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)  # flags win
    seed = int(np.random.SeedSequence([args.seed, checkpoint["global_step"]]).generate_state(1)[0])
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def progress(elapsed, steps_done, steps_left):
    """elapsed=4m09s eta=10h31m: the elapsed time, and an ETA at this process's steps/s so far."""
    hms = lambda s: f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"elapsed={hms(round(elapsed))} eta={hms(round(elapsed * steps_left / steps_done))}"


if __name__ == "__main__":
    args, checkpoint = parse_args()
    check_args(args)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size

    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = False  # with TF32 the cell's sums over T x B lose three digits
    device, device_line = pick_device(args)
    print(device_line, flush=True)

    num_actions = envpool.make_spec(args.env_id).action_space.n
    agent = Agent((4, 84, 84), num_actions, args.hidden_size, args.core, args.freeze_stem).to(device)
    params = [p for p in agent.parameters() if p.requires_grad]  # a frozen stem's get no optimizer state either
    optimizer = torch.optim.RMSprop(params, lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)
    start_iteration, global_step = (checkpoint["iteration"], checkpoint["global_step"]) if checkpoint else (0, 0)
    if checkpoint:  # before anything is written: a file that does not fit costs nothing
        resume(checkpoint, agent, optimizer, args)
    elif args.init_stem_from:
        load_stem(agent, args.init_stem_from)
    run_name = f"{args.env_id}__{args.exp_name}__{args.core}__T{args.num_steps}__{args.seed}__{int(time.time())}"
    run_name = checkpoint["run_name"] if checkpoint else run_name  # resumed: its logs go on after its step (purge_step)
    writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1 if checkpoint else None)
    writer.add_text("device", device_line)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    # resumed: every environment starts a new episode, from new seeds, and c and the sensitivities from zero
    seeds = env_seeds([args.seed, global_step], args.num_envs + min(args.eval_episodes, args.num_envs))
    envs = AtariEnvs(args.env_id, seeds[: args.num_envs], device)

    T, B = args.num_steps, args.num_envs
    c, sens = agent.cell.initial_state(B)
    start_step, start_time, last_line, recent_returns = global_step, time.time(), 0.0, []
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    stop = []  # Ctrl-C / SIGTERM: the update is finished, the checkpoint written, and the exit code 128 + signum
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}

    for iteration in range(start_iteration + 1, args.num_iterations + 1):
        last = iteration == args.num_iterations
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

        c0, features, steps = c, [], []
        for _ in range(T):
            global_step += B
            features.append(agent.features(envs.obs, envs.last_reward))  # with the stem's graph, for the update
            action, value, c = agent.act(features[-1], c, envs.first)
            seen = (envs.obs, envs.last_reward, envs.first, envs.terminal_obs)
            reward, term, games = envs.step(action)
            steps.append((*seen, action, reward, term, value))
            for _, game_return, game_length in games:
                writer.add_scalar("charts/episodic_return", game_return, global_step)
                writer.add_scalar("charts/episodic_length", game_length, global_step)
                recent_returns = (recent_returns + [game_return])[-20:]
        rollout = Rollout(*map(torch.stack, zip(*steps)))

        with torch.no_grad():  # c itself moves on in the next rollout
            next_value = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first)[1]
        returns = n_step_returns(rollout, next_value, args.gamma)
        optimizer.zero_grad()
        stats, sens = compute_gradients(agent, rollout, torch.stack(features), returns, c0, sens, args)
        grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        optimizer.step()

        sps = int((global_step - start_step) / (time.time() - start_time))  # this process's steps only
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for key, value in {**stats, "grad_norm": grad_norm.item()}.items():
            writer.add_scalar(f"losses/{key}", value, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if time.time() - last_line > 10 or last:
            last_line, mean_return = time.time(), f"{np.mean(recent_returns):.2f}" if recent_returns else "n/a"
            clock = progress(time.time() - start_time, global_step - start_step, args.num_iterations * B * T - global_step)
            print(f"global_step={global_step} SPS={sps} {clock} return(last 20 games)={mean_return}", flush=True)
        # a checkpoint at each multiple of --checkpoint-every (one was passed in this update), and at the end
        if stop or (args.checkpoint_every and (global_step % args.checkpoint_every < B * T or last)):
            state = dict(optimizer=optimizer.state_dict(), run_name=run_name, iteration=iteration, global_step=global_step)
            save_checkpoint(agent, args, checkpoint_path, **state)
        if stop:
            print(f"stopped by {signal.Signals(stop[0]).name} at global_step={global_step}: --resume {checkpoint_path}")
            envs.close(), writer.close(), sys.exit(128 + stop[0])
    envs.close()
    for signum, handler in handlers.items():  # from here on, Ctrl-C stops at once
        signal.signal(signum, handler)

    if args.save_model:
        save_checkpoint(agent, args, f"runs/{run_name}/model.pt")
        print(f"model saved to runs/{run_name}/model.pt")
    if args.eval_episodes > 0:
        envs = AtariEnvs(args.env_id, seeds[args.num_envs :], device)
        eval_returns = [game_return for game_return, _ in greedy_episodes(agent, envs, args.eval_episodes)]
        envs.close()
        for i, eval_return in enumerate(eval_returns):
            writer.add_scalar("eval/episodic_return", eval_return, i)
        print(f"greedy evaluation over {len(eval_returns)} games: mean return {np.mean(eval_returns):.2f}")
    writer.close()
