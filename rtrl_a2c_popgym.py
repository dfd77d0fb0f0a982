"""A2C with an element-wise LSTM trained by exact real-time recurrent learning (RTRL) on POPGym's memory tasks.

Irie, Gopalakrishnan, Schmidhuber, "Exploring the Promise and Limits of Real-Time Recurrent Learning", ICLR 2024
(arXiv 2305.19044). The eLSTM's recurrence is diagonal, so its RTRL sensitivities cost O(B N D) per step: its
parameters get untruncated gradients with no stored history. POPGym (Morad et al., ICLR 2023) is the benchmark
recurrent RL reports on: RepeatFirst holds one card for a whole episode (51 / 415 / 831 steps), CountRecall
integrates over one, RepeatPrevious and Autoencode hold many cards at once, PositionOnlyCartPole must infer the
velocities. Its metric, MMER, is the best mean return of recent episodes over training; every task scales an
episode's return into [-1, 1]. The agent is rtrl_a2c_bsuite.py's with no stem: the cell reads the observation one-hot
encoded, the previous action (POPGym's PreviousAction wrapper) and the last reward.

    python rtrl_a2c_popgym.py --env-id popgym-RepeatFirstMedium-v0      # --core tbptt | lstm | ff
    python rtrl_a2c_popgym.py --num-seeds 3             # 3 agents (seeds 1-3) in one process, a run dir each
"""

import difflib
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import popgym  # noqa: F401 (registers popgym-<Env><Difficulty>-v0 with gymnasium)
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    run_name: str = ""
    """the run directory under runs/ (default: env__exp__core__unroll__seed__time); an existing one is refused"""
    seed: int = 1
    """seed of the experiment (of the first agent: the K agents of --num-seeds have seeds seed, ..., seed + K - 1)"""
    num_seeds: int = 1
    """K, the number of independent agents trained together in this process, each into its own run directory
    (with --run-name NAME and K > 1: NAME__s<seed>)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    save_model: bool = False
    """whether to save the model and its args to `runs/{run_name}/model.pt`"""

    # Algorithm specific arguments
    env_id: str = "popgym-RepeatFirstEasy-v0"
    """a popgym id, popgym-<Env><Easy|Medium|Hard>-v0"""
    total_timesteps: int = 2_000_000
    """environment steps of each agent (POPGym's protocol: 15M)"""
    num_envs: int = 64
    """the number of parallel environments (more than bsuite's 16: the envs step in Python, an op serves them all)"""
    num_steps: int = 4
    """the rollout (= unroll) length; 1 updates after every environment step, fully online"""
    learning_rate: float = 3e-3
    """the learning rate of the optimizer (constant)"""
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
    """N, the size of the recurrent state (eLSTM c; for lstm, h and c each); POPGym's memory has 256"""
    core: Literal["rtrl", "tbptt", "lstm", "ff"] = "rtrl"
    """rtrl: eLSTM with exact untruncated RTRL gradients; tbptt: the same eLSTM with BPTT cut at each
    rollout's start; lstm: a standard LSTM with BPTT cut the same way; ff: no memory (the eLSTM with
    its state zeroed at every step)"""
    forget_bias: float = 3.0
    """added to the forget gate's bias at initialisation (eLSTM b_f; the LSTM's forget-gate bias): f near 1, so
    credit survives many steps from the start"""
    mmer_window: int = 100
    """MMER: the maximum over training of the mean return of an agent's last this many episodes (RLlib's smoothing
    window, which POPGym's MMER reads)"""


def one_hot_sizes(space):
    """The one-hot parts of a Discrete, MultiDiscrete or Tuple-of-Discrete observation; None for a Box (read as it is)."""
    if isinstance(space, gym.spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, gym.spaces.MultiDiscrete):
        return [int(n) for n in np.ravel(space.nvec)]
    if isinstance(space, gym.spaces.Tuple) and all(isinstance(s, gym.spaces.Discrete) for s in space.spaces):
        return [int(s.n) for s in space.spaces]
    if isinstance(space, gym.spaces.Box):
        return None
    raise ValueError(f"observations of {space} are not supported (Discrete, MultiDiscrete, Tuple of Discrete, Box)")


class Envs:
    """popgym environments stepped together, one per seed, shaped as `seeds` (K x B for a population). An observation
    is [its one-hot encoding (a Box's: itself) ; the previous action one-hot (zeros at an episode's start)].

    As EnvPool's: the step that ends an episode returns its last observation, flagged `terminal_obs` (no loss, its
    value bootstraps a truncation: PositionOnlyCartPole's time limit); the next step ignores its action and returns the
    next episode's first observation, flagged `first` (state and sensitivities zeroed, Method §6) with last reward 0.
    """

    def __init__(self, env_id, seeds, device):
        self.shape, self.device = np.shape(seeds), device
        self.envs = [gym.make(env_id, disable_env_checker=True) for _ in np.ravel(seeds)]
        self.sizes = one_hot_sizes(self.envs[0].observation_space)
        self.num_actions = int(self.envs[0].action_space.n)
        obs_size = sum(self.sizes) if self.sizes else int(np.prod(self.envs[0].observation_space.shape))
        self.obs_shape = (obs_size + self.num_actions,)
        n = len(self.envs)
        self.raw = [env.reset(seed=int(s))[0] for env, s in zip(self.envs, np.ravel(seeds))]
        self.prev_action = np.full(n, -1)  # none
        self.episode_return, self.episode_length = np.zeros(n), np.zeros(n, dtype=np.int64)
        self.obs = self._pack()
        self.last_reward = torch.zeros(self.shape, device=device)
        self.first = torch.ones(self.shape, dtype=torch.bool, device=device)
        self.terminal_obs = torch.zeros(self.shape, dtype=torch.bool, device=device)

    def _pack(self):
        n = len(self.raw)
        if self.sizes is None:
            obs = np.array(self.raw, dtype=np.float32).reshape(n, -1)
        else:  # one 1 per part, at the part's offset plus its id
            ids = np.array(self.raw, dtype=np.int64).reshape(n, -1) + np.cumsum([0, *self.sizes[:-1]])
            obs = np.zeros((n, sum(self.sizes)), dtype=np.float32)
            obs[np.arange(n)[:, None], ids] = 1.0
        action = np.zeros((n, self.num_actions), dtype=np.float32)
        action[self.prev_action >= 0, self.prev_action[self.prev_action >= 0]] = 1.0
        return torch.as_tensor(np.concatenate([obs, action], 1).reshape(*self.shape, -1), device=self.device)

    def step(self, action):
        """Returns (reward, terminated) of the step and (env index, return, length) of the episodes that ended, in env
        order (env index: in the flattened `seeds`)."""
        n = len(self.envs)
        reward, term, done, ended = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), []
        for i, (env, a, terminal) in enumerate(
            zip(self.envs, action.flatten().tolist(), self.terminal_obs.flatten().tolist())
        ):
            if terminal:  # the action on a terminal observation is ignored
                self.raw[i], self.prev_action[i] = env.reset()[0], -1
                continue
            self.raw[i], reward[i], term[i], truncated, _ = env.step(a)
            self.prev_action[i] = a
            self.episode_return[i] += reward[i]
            self.episode_length[i] += 1
            if term[i] or truncated:
                ended.append((i, float(self.episode_return[i]), int(self.episode_length[i])))
                self.episode_return[i], self.episode_length[i], done[i] = 0.0, 0, True
        self.obs = self._pack()
        self.first = self.terminal_obs  # the step after a terminal observation returns a new episode's first one
        self.terminal_obs = torch.as_tensor(done, device=self.device).view(self.shape)
        self.last_reward = torch.as_tensor(reward, dtype=torch.float32, device=self.device).view(self.shape)
        return self.last_reward, torch.as_tensor(term, device=self.device).view(self.shape), ended


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


class Linear(nn.Linear):
    """nn.Linear, with a leading agent dim on its weight and bias in a population (x: ... x K x B x in)."""

    def __init__(self, in_features, out_features, num_agents=None):
        super().__init__(in_features, out_features)
        if num_agents is not None:  # the values are set by population(), from K single agents
            self.weight = nn.Parameter(self.weight.expand(num_agents, -1, -1).clone())
            self.bias = nn.Parameter(self.bias.expand(num_agents, -1).clone())

    def forward(self, x):
        if self.weight.dim() == 2:  # one agent
            return F.linear(x, self.weight, self.bias)
        # K agents: one batched GEMM, the leading dims of x (time) folded into its rows (not the weight copied per step)
        rows = x.movedim(-3, 0)
        y = torch.baddbmm(self.bias.unsqueeze(-2), rows.reshape(len(rows), -1, x.shape[-1]), self.weight.mT)
        return y.view(*rows.shape[:-1], -1).movedim(0, -3)


class LSTM(nn.Module):
    """The conventional baseline (`--core lstm`): a standard LSTM (nn.LSTMCell's equations, gates i, f, g, o, and
    its init), its state [h ; c] kept as one B x 2N tensor so that it travels through the loop like the eLSTM's c,
    reset where `done` is set."""

    def __init__(self, input_size, hidden_size, num_agents=None):
        super().__init__()
        self.ih, self.hh = Linear(input_size, 4 * hidden_size, num_agents), Linear(hidden_size, 4 * hidden_size, num_agents)
        for p in self.parameters():
            nn.init.uniform_(p, -(hidden_size**-0.5), hidden_size**-0.5)

    def initial_state(self, batch_size):
        return self.hh.bias.new_zeros(*self.hh.bias.shape[:-1], batch_size, self.hh.in_features * 2), {}

    def forward(self, x, state0, done):
        notdone = (~done.bool()).unsqueeze(-1).to(x.dtype)
        state, states, gates_x = state0, [], self.ih(x)  # every step's input projection in one GEMM
        for gates_x_t, notdone_t in zip(gates_x.unbind(), notdone.unbind()):
            h, c = (state * notdone_t).chunk(2, -1)
            i, f, g, o = (gates_x_t + self.hh(h)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            state = torch.cat([torch.sigmoid(o) * torch.tanh(c), c], -1)
            states.append(state)
        return torch.stack(states)


# ---------------------------------------------------------------------------------------------
# The agent (Method §5, with no stem: the cell reads the observation)
# ---------------------------------------------------------------------------------------------
class Agent(nn.Module):
    """One agent (x: T x B x D), or K of them with num_agents=K: each parameter gets a leading agent dim, each tensor
    an agent dim before its batch dim (T x K x B x D). Make a population with population()."""

    def __init__(self, obs_shape, num_actions, hidden_size, core="rtrl", forget_bias=0.0, num_agents=None):
        super().__init__()
        self.core, k = core, num_agents
        # one-hot observations: a linear embedding below the cell would fold into W_z and W_f
        width = int(np.prod(obs_shape)) + 1
        self.cell = LSTM(width, hidden_size, k) if core == "lstm" else ELSTM(width, hidden_size, k)
        with torch.no_grad():  # as the official RTRLQuasiLSTMlayer(forget_bias=...); the LSTM's gates are i, f, g, o
            (self.cell.ih.bias[..., hidden_size : 2 * hidden_size] if core == "lstm" else self.cell.b_f).add_(forget_bias)
        # the eLSTM's output gate (Method §1); the LSTM has its own
        self.gate = None if core == "lstm" else Linear(width + hidden_size, hidden_size, k)
        self.actor = Linear(hidden_size, num_actions, k)
        self.critic = Linear(hidden_size, 1, k)

    def features(self, obs, last_reward):
        """x = [observation ; clip(last reward)], for any leading dims of obs."""
        dtype = self.critic.weight.dtype
        return torch.cat([obs.to(dtype), last_reward.clamp(-1, 1).unsqueeze(-1).to(dtype)], -1)

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
    def act(self, x, c, first):
        """One environment step of the policy from the step's features x: (action, value, next c)."""
        c = self.cell(x[None], c, self.resets(first)[None])[0]
        logits, value = self.heads(x, c)
        return torch.multinomial(logits.softmax(-1).flatten(0, -2), 1).view(value.shape), value, c


def population(seeds, *agent_args):
    """K agents stacked on a leading dim; agent k starts from the parameters of the single run with seed seeds[k]
    (the global RNG is left as that run's after its init)."""
    agent = Agent(*agent_args, num_agents=len(seeds))
    singles = []
    for seed in seeds:
        torch.manual_seed(seed)
        singles.append(Agent(*agent_args).state_dict())
    agent.load_state_dict({name: torch.stack([single[name] for single in singles]) for name in singles[0]})
    return agent


@dataclass
class Rollout:
    """What one rollout of T steps x B envs keeps for the update (the CleanRL storage)."""

    obs: torch.Tensor  # T x B x observation size (T x K x B x ... for a population, here and below)
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
    """The A2C loss summed over time and batch, terminal observations left out (Method §5; over agents too: each
    agent's parameters see only its own), and its parts for logging, agent by agent."""
    logits, value = agent.heads(x, c)
    logp = logits.log_softmax(-1)
    advantages = (returns - value).detach()
    live = (~rollout.terminal_obs).to(value.dtype)
    per_agent = lambda y: (live * y).sum((0, -1))  # over time and batch: T x [K x] B -> [K]
    pg_loss = -per_agent(logp.gather(-1, rollout.actions.unsqueeze(-1)).squeeze(-1) * advantages)
    v_loss = 0.5 * per_agent((returns - value) ** 2)
    entropy = -per_agent((logp.exp() * logp).sum(-1))
    loss = (pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy).sum()
    return loss, {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy.detach()}


def compute_gradients(agent, rollout, returns, c0, sens0, args):
    """Fill every parameter's .grad for one rollout's loss; return (stats, sens_T).

    rtrl: the eLSTM gets exact untruncated gradients from the carried sensitivities; gate and heads get backprop
    (Method §5). tbptt / lstm / ff: autograd within the rollout.
    """
    resets = agent.resets(rollout.firsts)
    x = agent.features(rollout.obs, rollout.last_rewards)
    if args.core != "rtrl":
        loss, stats = rollout_loss(agent, rollout, returns, x, agent.cell(x, c0, resets), args)
        loss.backward()
        return stats, sens0
    scan = agent.cell.scan(x, c0, resets)
    c_leaf = scan[0].requires_grad_()  # its grad is the local delta_t = dL/dc_t (Method §2)
    loss, stats = rollout_loss(agent, rollout, returns, x, c_leaf, args)
    loss.backward()
    grads, sens_T = agent.cell.rtrl_scan(x, scan, sens0, c_leaf.grad, overwrite=True)[:2]
    for name, p in agent.cell.named_parameters():
        p.grad = grads[name]
    return stats, sens_T


def clip_grad_norms_(parameters, max_norm):
    """nn.utils.clip_grad_norm_ agent by agent: each agent's global norm over its own gradients (the leading dim of
    every .grad), clipped to max_norm; returns the K norms before clipping."""
    grads = [p.grad for p in parameters]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
    return norms


class Returns:
    """One agent's episodes: (global step, return), and POPGym's MMER: the best mean return of `window` consecutive
    episodes, checked as each episode ends (none before `window` have)."""

    def __init__(self, window):
        self.window, self.steps, self.returns, self.mmer = window, [], [], float("nan")

    def add(self, step, episode_return):
        self.steps.append(step)
        self.returns.append(episode_return)
        if len(self.returns) >= self.window:
            self.mmer = np.nanmax([self.mmer, np.mean(self.returns[-self.window :])])

    def final(self, total_timesteps, fraction=0.1):
        """The mean return of the episodes that ended in the last `fraction` of training, and how many they are."""
        last = [r for s, r in zip(self.steps, self.returns) if s > (1 - fraction) * total_timesteps]
        return (float(np.mean(last)) if last else float("nan")), len(last)


# ---------------------------------------------------------------------------------------------
# Infrastructure: argument checks, seeds, the device
# ---------------------------------------------------------------------------------------------
def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    """Only what would otherwise run silently wrong or end in a traceback."""
    ids = sorted(k for k in gym.registry if k.startswith("popgym-"))
    if args.env_id not in ids:
        close = difflib.get_close_matches(args.env_id, ids, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (popgym-<Env><Easy|Medium|Hard>-v0)"
        fail(f"unknown popgym id {args.env_id!r}{hint}")
    if not (args.learning_rate > 0 and args.max_grad_norm > 0):  # clip_grad_norm_ would flip the gradient's sign
        fail(f"--learning-rate and --max-grad-norm must be positive, got {args.learning_rate}, {args.max_grad_norm}")
    if not (args.rms_eps >= 0 and 0 <= args.rms_alpha <= 1 and 0 <= args.gamma <= 1):  # would run, wrongly
        fail(f"--rms-eps must be >= 0, --rms-alpha and --gamma in [0, 1], got {args.rms_eps}, {args.rms_alpha}, {args.gamma}")
    for name in ("total_timesteps", "num_envs", "num_steps", "hidden_size", "num_seeds", "mmer_window"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_steps * args.num_envs > args.total_timesteps:  # not one update
        steps = f"--num-steps {args.num_steps} x --num-envs {args.num_envs}"
        fail(f"a rollout of {steps} is more than --total-timesteps {args.total_timesteps}: not one update")
    if args.run_name and (os.sep in args.run_name or args.run_name in (".", "..")):
        fail(f"--run-name names one directory under runs/, got {args.run_name!r}")
    actions = gym.make(args.env_id, disable_env_checker=True).action_space
    if not isinstance(actions, gym.spaces.Discrete):  # the pendulums
        fail(f"{args.env_id}: its actions are {actions}; the policy here is categorical (Discrete actions)")


def run_names(args, seeds):
    """Each agent's run directory under runs/: --run-name (NAME__s<seed> for K > 1), or env__exp__core__unroll__seed__time."""
    if args.run_name:
        return [args.run_name] if len(seeds) == 1 else [f"{args.run_name}__s{seed}" for seed in seeds]
    stem = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.core}__T{args.num_steps}"
    return [f"{stem}__{seed}__{int(time.time())}" for seed in seeds]


def env_seeds(seed, n):
    """Distinct per-env seeds derived from --seed (Method §6)."""
    return np.random.default_rng(seed).choice(2**31 - 1, size=n, replace=False)


def pick_device(args):
    """The device and the line that names it, printed and logged at start: a fallback to the CPU is never silent
    (a torch CUDA build that does not match the driver finds no device)."""
    if args.cuda and torch.cuda.is_available():
        device = torch.device("cuda:0")
        return device, f"device: cuda:0 ({torch.cuda.get_device_name(device)}, torch CUDA {torch.version.cuda})"
    return torch.device("cpu"), ("device: cpu (--cuda: no CUDA device found)" if args.cuda else "device: cpu")


def progress(elapsed, steps_done, steps_left):
    """elapsed=4m09s eta=10h31m: the elapsed time, and an ETA at this process's rate so far."""
    hms = lambda s: f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"elapsed={hms(round(elapsed))} eta={hms(round(elapsed * steps_left / steps_done)) if steps_done else '?'}"


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    names = run_names(args, seeds)
    for name in names:  # all checked before any is written
        if os.path.exists(f"runs/{name}"):
            fail(f"runs/{name} exists; a run directory is never shared by two runs")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device, device_line = pick_device(args)
    print(device_line, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # RTRL = BPTT in float32 needs full-precision GEMMs

    T, K, B = args.num_steps, args.num_seeds, args.num_envs
    envs = Envs(args.env_id, np.stack([env_seeds(seed, B) for seed in seeds]), device)  # K x B, agent by agent
    agent = population(seeds, envs.obs_shape, envs.num_actions, args.hidden_size, args.core, args.forget_bias).to(device)
    # RMSprop is element-wise: on stacked parameters it is K independent optimizers
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)
    writers = [SummaryWriter(f"runs/{name}") for name in names]  # the first thing written, once the input is known good
    for writer, seed in zip(writers, seeds):  # each agent's args are its single run's, with its seed
        table = "\n".join([f"|{key}|{value}|" for key, value in {**vars(args), "seed": seed}.items()])
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        writer.add_text("device", device_line)

    flags = dict(dtype=torch.bool, device=device)
    rollout = Rollout(
        obs=torch.zeros((T, K, B, *envs.obs_shape), device=device),
        last_rewards=torch.zeros((T, K, B), device=device),
        firsts=torch.zeros((T, K, B), **flags),
        terminal_obs=torch.zeros((T, K, B), **flags),
        actions=torch.zeros((T, K, B), dtype=torch.long, device=device),
        rewards=torch.zeros((T, K, B), device=device),
        terms=torch.zeros((T, K, B), **flags),
        values=torch.zeros((T, K, B), device=device),
    )
    c, sens = agent.cell.initial_state(B)
    episodes = [Returns(args.mmer_window) for _ in seeds]
    num_updates, global_step, start_time, last_line = args.total_timesteps // (T * B), 0, time.time(), 0.0

    for update in range(1, num_updates + 1):
        c0 = c
        for step in range(T):
            global_step += B  # each agent's environment steps
            rollout.obs[step], rollout.last_rewards[step] = envs.obs, envs.last_reward
            rollout.firsts[step], rollout.terminal_obs[step] = envs.first, envs.terminal_obs
            action, rollout.values[step], c = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first)
            rollout.actions[step] = action
            rollout.rewards[step], rollout.terms[step], ended = envs.step(action)
            for i, episode_return, length in ended:
                k = i // B
                episodes[k].add(global_step, episode_return)
                writers[k].add_scalar("charts/episodic_return", episode_return, global_step)
                writers[k].add_scalar("charts/episodic_length", length, global_step)

        with torch.no_grad():  # c itself moves on in the next rollout
            next_value = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first)[1]
        returns = n_step_returns(rollout, next_value, args.gamma)
        optimizer.zero_grad()
        stats, sens = compute_gradients(agent, rollout, returns, c0, sens, args)
        stats["grad_norm"] = clip_grad_norms_(list(agent.parameters()), args.max_grad_norm)  # each its own clip
        stats["value_max"] = rollout.values.abs().amax((0, -1))  # a critic diverging with its own bootstrap shows here
        optimizer.step()

        sps = int(global_step / (time.time() - start_time))  # an agent's; the process makes K times as many
        if update % 10 == 1 or update == num_updates:  # many updates: TensorBoard shows ~1,000s of points
            for writer, values, mine in zip(writers, torch.stack(list(stats.values()), 1).tolist(), episodes):
                for key, value in zip(stats, values):  # one host sync above
                    writer.add_scalar(f"losses/{key}", value, global_step)
                writer.add_scalar("charts/SPS", sps, global_step)
                if mine.mmer == mine.mmer:  # not NaN: a window of episodes has ended
                    writer.add_scalar("charts/mmer", mine.mmer, global_step)
        if time.time() - last_line > 10 or update == num_updates:
            last_line = time.time()
            recent = [np.mean(e.returns[-args.mmer_window :]) for e in episodes if e.returns]
            print(
                f"global_step={global_step} SPS={sps}{f' x {K} agents' if K > 1 else ''} "
                f"{progress(time.time() - start_time, global_step, args.total_timesteps - global_step)} "
                f"return(last {args.mmer_window})={np.mean(recent) if recent else float('nan'):.3f}",
                flush=True,
            )

    for k, (seed, name, writer) in enumerate(zip(seeds, names, writers)):
        final, count = episodes[k].final(global_step)
        line = (
            f"popgym {args.env_id}, seed {seed}: MMER {episodes[k].mmer:.3f} (the best mean return of "
            f"{args.mmer_window} consecutive episodes), last 10% {final:.3f} ({count} episodes), "
            f"{len(episodes[k].returns)} episodes in {global_step} steps"
        )
        print(line, flush=True)
        writer.add_text("popgym", line)
        writer.add_scalar("popgym/mmer", episodes[k].mmer, global_step)
        writer.add_scalar("popgym/final_return", final, global_step)
        if args.save_model:  # the single agent's parameters, as its single run saves them
            model = {key: value[k].cpu() for key, value in agent.state_dict().items()}
            torch.save({"model": model, "args": {**vars(args), "seed": seed}}, f"runs/{name}/model.pt")
            print(f"model saved to runs/{name}/model.pt")
        writer.close()
