"""A2C with an element-wise LSTM trained by exact real-time recurrent learning (RTRL) on MiniGrid.

Irie, Gopalakrishnan, Schmidhuber, "Exploring the Promise and Limits of Real-Time Recurrent
Learning", ICLR 2024 (arXiv 2305.19044). The eLSTM's recurrence is diagonal, so its RTRL
sensitivities cost O(B N D) per step, like its input projection: the recurrent parameters get
untruncated gradients from carried sensitivities, with no stored history. MiniGrid's Memory tasks
(see a cue object, walk a corridor, touch the matching object) test exactly that: a dependency
that can be longer than the unroll. EnvPool's CartPole-v1 and Acrobot-v1 with their velocities hidden
run through the same agent (an MLP on the remaining observation), as smaller memory tasks.

    python rtrl_a2c_minigrid.py --env-id MiniGrid-MemoryS7-v0 --num-steps 2   # --core tbptt | lstm | ff
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
    run_name: str = ""
    """the run directory under runs/ (default: env__exp__core__unroll__seed__time); an existing one is refused"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    save_model: bool = False
    """whether to save the model and its args to `runs/{run_name}/model.pt`"""
    checkpoint_every: int = 0
    """agent steps between checkpoints, written atomically to `runs/{run_name}/checkpoint.pt` (0 = none); one is
    also written at the end when this is set, and always on Ctrl-C / SIGTERM"""
    resume: str = ""
    """a checkpoint.pt to continue: model, optimizer, LR position, step and RNG states are restored and the run
    directory's logs go on; every environment starts a new episode with zero recurrent state and sensitivities"""

    # Algorithm specific arguments
    env_id: str = "MiniGrid-MemoryS7-v0"
    """the id of an EnvPool MiniGrid environment (MiniGrid-*), or CartPole-v1 / Acrobot-v1 with the velocities hidden"""
    actions: Literal["movement", "full"] = "movement"
    """MiniGrid: movement = left, right, forward (all a Memory task needs); full = its 7 actions"""
    total_timesteps: int = 2_000_000
    """total agent steps over all environments"""
    num_envs: int = 16
    """the number of parallel environments"""
    num_steps: int = 8
    """the rollout (= unroll) length; 1 updates after every environment step, fully online"""
    learning_rate: float = 1e-3
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
    hidden_size: int = 128
    """N, the size of the recurrent state (eLSTM c; for lstm, h and c each)"""
    core: Literal["rtrl", "tbptt", "lstm", "ff"] = "rtrl"
    """rtrl: eLSTM with exact untruncated RTRL gradients; tbptt: the same eLSTM with BPTT cut at each
    rollout's start; lstm: a standard LSTM with BPTT cut the same way; ff: no memory (the eLSTM with
    its state zeroed at every step)"""
    rtrl_impl: Literal["chunked", "step"] = "chunked"
    """exact RTRL in one GEMM-shaped pass per rollout (chunked) or by the per-step recursion (step): same numbers"""
    eval_episodes: int = 32
    """greedy evaluation after training: this many fresh environments play one episode each; 0 skips it"""
    staleness_every: int = 0
    """diagnostic, 0 = off: every this many updates, compare the eLSTM gradient of the update with the exact
    gradient of the same loss at the current parameters (BPTT through each episode so far); logs diag/*"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    for name in ("total_timesteps", "num_envs", "num_steps", "hidden_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_episodes", "staleness_every", "checkpoint_every"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    ranges = {  # inclusive bounds
        "learning_rate": (0.0, float("inf")),
        "rms_eps": (0.0, float("inf")),
        "rms_alpha": (0.0, 1.0),
        "gamma": (0.0, 1.0),
        "ent_coef": (0.0, float("inf")),
        "vf_coef": (0.0, float("inf")),
    }
    for name, (low, high) in ranges.items():
        if not low <= getattr(args, name) <= high:
            fail(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {getattr(args, name)}")
    if args.max_grad_norm <= 0:
        fail(f"--max-grad-norm must be positive, got {args.max_grad_norm}")
    if args.total_timesteps < args.num_envs * args.num_steps:
        fail(
            f"--total-timesteps {args.total_timesteps} is less than one rollout "
            f"(--num-envs x --num-steps = {args.num_envs * args.num_steps})"
        )
    if args.eval_episodes > 1024:
        fail(f"--eval-episodes opens one environment per episode: at most 1024, got {args.eval_episodes}")
    if args.run_name and (os.sep in args.run_name or args.run_name in (".", "..")):
        fail(f"--run-name names one directory under runs/, got {args.run_name!r}")
    if args.actions == "full" and args.env_id in Envs.MASKED_CLASSIC:
        fail(f"--actions full is for MiniGrid; {args.env_id} has its own action set")
    if args.staleness_every and args.core not in ("rtrl", "tbptt"):
        fail(f"--staleness-every measures the eLSTM's gradient: needs --core rtrl or tbptt, got {args.core}")
    ids = sorted(k for k, v in envpool.registration.registry.specs.items() if v[0] == "envpool.minigrid")
    ids += list(Envs.MASKED_CLASSIC)
    if args.env_id not in ids:
        close = difflib.get_close_matches(args.env_id, ids, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid ids look like {', '.join(ids[:3])}, ..."
        fail(f"unknown env id {args.env_id!r} (MiniGrid-* or {' / '.join(Envs.MASKED_CLASSIC)}); {hint}")


class Envs:
    """EnvPool MiniGrid, observed as the 7x7x3 symbolic view plus the facing direction; or a masked
    classic-control task, observed as its positions only (so the velocities must be remembered).

    EnvPool ends episodes here as in Atari (checked in the tests): the step after a `terminated` /
    `truncated` one returns the next episode's first observation and ignores its action. So the step
    taking the terminal observation is `dead` (its value bootstraps a truncation, it gets no loss), and
    the step after it is `first` (state and sensitivities reset). Success: MiniGrid, terminating with
    a positive reward (the matching object in a Memory task); CartPole, lasting to the time limit;
    Acrobot, swinging up before it.
    """

    OBS_SIZE = 7 * 7 * 3 + 1  # MiniGrid: the view's (object, colour, state) ids, flattened, then the direction
    MASKED_CLASSIC = {"CartPole-v1": (0, 2), "Acrobot-v1": (0, 1, 2, 3)}  # the observation entries kept

    def __init__(self, env_id, seeds, device, actions="movement"):
        self.envs = envpool.make(env_id, env_type="gymnasium", num_envs=len(seeds), env_seed=[int(s) for s in seeds])
        self.kept = self.MASKED_CLASSIC.get(env_id)
        self.obs_shape = (self.OBS_SIZE,) if self.kept is None else (len(self.kept),)
        # MiniGrid's actions 0, 1, 2 are turn left, turn right, move forward
        self.num_actions = 3 if actions == "movement" and self.kept is None else self.envs.action_space.n
        self.success = {"CartPole-v1": "truncated", "Acrobot-v1": "terminated"}.get(env_id, "positive reward")
        self.device = device
        n = len(seeds)
        obs, _ = self.envs.reset()
        self.obs = self._pack(obs)
        self.last_reward = torch.zeros(n, device=device)
        self.first = torch.ones(n, dtype=torch.bool, device=device)
        self.dead = torch.zeros(n, dtype=torch.bool, device=device)
        self.episode_return = np.zeros(n)

    def _pack(self, obs):
        if self.kept is not None:
            return torch.as_tensor(obs[:, self.kept], device=self.device)
        image = obs["image"].reshape(len(obs["image"]), -1)
        return torch.as_tensor(np.concatenate([image, obs["direction"][:, None].astype(np.uint8)], 1), device=self.device)

    def step(self, action):
        """Returns (reward, terminated) of the step and (env, return, length, success) of episodes that ended."""
        obs, reward, term, trunc, info = self.envs.step(action.cpu().numpy())
        self.episode_return += reward
        episodes = []
        for i in np.flatnonzero(term | trunc):
            success = bool({"truncated": trunc[i], "terminated": term[i]}.get(self.success, term[i] and reward[i] > 0))
            episodes.append((int(i), self.episode_return[i], int(info["elapsed_step"][i]), success))
            self.episode_return[i] = 0.0
        self.first = self.dead  # the step after a dead one returns a new episode's first observation
        self.dead = torch.as_tensor(term | trunc, device=self.device)
        self.obs = self._pack(obs)
        self.last_reward = torch.as_tensor(reward, dtype=torch.float32, device=self.device)
        return self.last_reward, torch.as_tensor(term, device=self.device), episodes

    def close(self):
        self.envs.close()


# ---------------------------------------------------------------------------------------------
# The element-wise LSTM and its exact RTRL (Method §1-3)
# ---------------------------------------------------------------------------------------------
class ELSTM(nn.Module):
    """c_t = f_t * c_{t-1} + (1 - f_t) * z_t, with z, f reading c_{t-1} only element-wise (Method §1).

    The output gate lives outside (Agent.heads): it is feed-forward and needs no sensitivities.
    """

    MATRICES = ("w_z", "w_f")  # sensitivities B x N x D; the rest are vectors, B x N

    def __init__(self, input_size, hidden_size):
        super().__init__()
        n, d = hidden_size, input_size
        self.w_z, self.w_f = (nn.Parameter(0.1 * torch.randn(n, d)) for _ in range(2))
        self.v_z, self.v_f, self.b_z, self.b_f = (nn.Parameter(0.1 * torch.randn(n)) for _ in range(4))

    def initial_state(self, batch_size):
        """(c, sens): zero state and zero sensitivities dc/dtheta, one B x shape(theta) tensor per parameter."""
        p = self.w_z
        c = p.new_zeros(batch_size, p.shape[0])
        sens = {name: p.new_zeros(batch_size, *q.shape) for name, q in self.named_parameters()}
        return c, sens

    def _scan(self, x, c0, done):
        """The recurrence over T steps; x: T x B x D, c0: B x N, done: T x B (reset before step t)."""
        pre_z = F.linear(x, self.w_z, self.b_z)  # all steps' input projections in one GEMM
        pre_f = F.linear(x, self.w_f, self.b_f)
        notdone = (~done.bool()).unsqueeze(-1).to(x.dtype)
        c, cs, c_prevs, zs, fs = c0, [], [], [], []
        # unbind, not pre_z[t]: backprop then assembles one T x B x N gradient, not one per step
        for pre_z_t, pre_f_t, notdone_t in zip(pre_z.unbind(), pre_f.unbind(), notdone.unbind()):
            c_prev = c * notdone_t
            z = torch.tanh(torch.addcmul(pre_z_t, self.v_z, c_prev))
            f = torch.sigmoid(torch.addcmul(pre_f_t, self.v_f, c_prev))
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
        grads, sens_T, _ = self.rtrl_scan(x, self.scan(x, c0, done), sens, dl_dc, impl)
        return grads, sens_T

    @torch.no_grad()
    def rtrl_scan(self, x, scan, sens, dl_dc, impl="chunked", overwrite=False):
        """rtrl() from a scan() already made, plus dL/dx_t within the chunk: (grads, sens_T, dl_dx).

        R_t below is the within-chunk dL/dc_t, so dL/dx_t = W_z^T (alpha_t R_t) + W_f^T (beta_t R_t):
        the update gets the stem's gradient through the cell without an autograd pass over it.
        overwrite=True lets the chunked pass update the B x N x D tensors of `sens` in place (they
        become sens_T's): no new tensor of that size and one pass fewer over it. The caller gives them up.
        """
        _, c_prev, z, f, notdone = scan
        T, B, N = c_prev.shape
        # u = (alpha_t, beta_t), T x B x 2 x N: the increments of W_z's and W_f's sensitivities (times x_t)
        # and of b_z's and b_f's; v_z's and v_f's are these times c_{t-1}. One tensor, so that W_z and W_f
        # share every GEMM below.
        u = c_prev.new_empty(T, B, 2, N)
        alpha, beta = u.unbind(2)
        one_minus_f = 1 - f
        torch.addcmul(f.new_ones(()), z, z, value=-1, out=alpha).mul_(one_minus_f)  # dc_t / d pre-activation of z
        torch.sub(c_prev, z, out=beta).mul_(f).mul_(one_minus_f)  # dc_t / d pre-activation of f
        a = torch.addcmul(f, alpha, self.v_z).addcmul_(beta, self.v_f).mul_(notdone)  # J_t, zeroed across resets
        # R_s = delta_s + a_{s+1} R_{s+1}: what step s's sensitivity is worth to the chunk's loss;
        # P_s = a_{s+1} P_{s+1}: how much of step s's increment survives to T
        R, P = torch.empty_like(dl_dc), torch.empty_like(a)
        R[-1], P[-1] = dl_dc[-1], 1.0
        for t in range(T - 2, -1, -1):
            torch.addcmul(dl_dc[t], a[t + 1], R[t + 1], out=R[t])
            torch.mul(a[t + 1], P[t + 1], out=P[t])
        uR = u * R[:, :, None]  # (alpha_t R_t, beta_t R_t)
        if impl == "chunked":
            grads, sens_T = self._rtrl_chunked(x, c_prev, a, u, uR, R, P, sens, overwrite)
        else:
            grads, sens_T = self._rtrl_step(x, c_prev, a, u, sens, dl_dc)
        dl_dx = torch.mm(uR.view(T * B, 2 * N), torch.cat([self.w_z, self.w_f])).view(T, B, -1)
        return grads, sens_T, dl_dx

    def _rtrl_step(self, x, c_prev, a, u, sens, dl_dc):
        """Method §2: S_t = J_t * S_{t-1} + u_t (x) x_t;  grad += sum_b delta_t * S_t."""
        alpha, beta = u.unbind(2)
        u = {"w_z": alpha, "w_f": beta, "v_z": alpha * c_prev, "v_f": beta * c_prev, "b_z": alpha, "b_f": beta}
        grads = {k: torch.zeros_like(p) for k, p in self.named_parameters()}
        sens = dict(sens)
        for t in range(x.shape[0]):
            for k in grads:
                if k in self.MATRICES:
                    sens[k] = a[t, :, :, None] * sens[k] + u[k][t, :, :, None] * x[t, :, None, :]
                    grads[k] += torch.einsum("bn,bnd->nd", dl_dc[t], sens[k])
                else:
                    sens[k] = a[t] * sens[k] + u[k][t]
                    grads[k] += (dl_dc[t] * sens[k]).sum(0)
        return grads, sens

    def _rtrl_chunked(self, x, c_prev, a, u, uR, R, P, sens, overwrite):
        """Method §3: the same numbers, reading S_0 once and turning the rest into matrix products."""
        T, B, _, N = u.shape
        aR0, aP0 = a[0] * R[0], a[0] * P[0]
        # (alpha_t P_t, beta_t P_t), stored B x T x 2 x N: each batch row's N x T factor of S_T is a plain matrix
        uP = torch.mul(u, P[:, :, None], out=u.new_empty(B, T, 2, N).transpose(0, 1)).transpose(0, 1)
        # the chunk's own terms: sum_{t,b} (u_t R_t) x_t^T for W_z and W_f in one GEMM (2N x D), and the vectors'
        w = torch.mm(uR.view(T * B, 2 * N).T, x.flatten(0, 1))
        b, v = uR.sum((0, 1)), (uR * c_prev[:, :, None]).sum((0, 1))  # 2 x N: (b_z, b_f), (v_z, v_f)
        sb, sv = uP.sum(1), (uP * c_prev.transpose(0, 1)[:, :, None]).sum(1)  # B x 2 x N, for S_T
        chunk = {
            "w_z": (w[:N], uP[:, :, 0]),
            "w_f": (w[N:], uP[:, :, 1]),
            "v_z": (v[0], sv[:, 0]),
            "v_f": (v[1], sv[:, 1]),
            "b_z": (b[0], sb[:, 0]),
            "b_f": (b[1], sb[:, 1]),
        }
        # N x 1 x B, contiguous: then sum_b (a_1 R_1) * S_0 is one batched GEMM that reads S_0 where it lies
        aR0_n1b = aR0.T.contiguous().unsqueeze(1)
        x_bt = x.transpose(0, 1)  # B x T x D
        grads, sens_T = {}, {}
        for k, s0 in sens.items():
            g, s = chunk[k]
            if k in self.MATRICES:
                grads[k] = torch.bmm(aR0_n1b, s0.transpose(0, 1)).squeeze(1).add_(g)
                scaled = s0.mul_(aP0[:, :, None]) if overwrite else s0 * aP0[:, :, None]
                sens_T[k] = scaled.baddbmm_(s.transpose(1, 2), x_bt)  # + sum_t (u_t P_t) x_t^T, batch row by row
            else:
                grads[k] = (aR0 * s0).sum(0).add_(g)
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


# ---------------------------------------------------------------------------------------------
# The agent (Method §5, with an MLP on the one-hot symbolic view in place of the IMPALA stem)
# ---------------------------------------------------------------------------------------------
VIEW_IDS = (11, 6, 3)  # MiniGrid's object, colour and state ids


def one_hot_view(obs, dtype):
    """uint8 [7x7 (object, colour, state) ids ; direction] -> one-hot per cell and id, flattened (7*7*20 + 4).

    One-hot, not the raw ids: ids are categories, and a Linear layer on one-hots is an embedding per
    cell and id.
    """
    cells = obs[..., :-1].long().unflatten(-1, (49, 3))
    view = torch.cat([F.one_hot(cells[..., i].clamp(0, n - 1), n) for i, n in enumerate(VIEW_IDS)], -1).flatten(-2)
    return torch.cat([view, F.one_hot(obs[..., -1].long().clamp(0, 3), 4)], -1).to(dtype)


class Agent(nn.Module):
    def __init__(self, obs_shape, num_actions, hidden_size, core="rtrl"):
        super().__init__()
        self.core = core
        self.symbolic = tuple(obs_shape) == (Envs.OBS_SIZE,)  # MiniGrid; else a masked classic-control vector
        width = 49 * sum(VIEW_IDS) + 4 if self.symbolic else obs_shape[0]
        self.stem = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.cell = LSTM(128 + 1, hidden_size) if core == "lstm" else ELSTM(128 + 1, hidden_size)
        # the eLSTM's output gate (Method §1); the LSTM has its own
        self.gate = None if core == "lstm" else nn.Linear(128 + 1 + hidden_size, hidden_size)
        self.actor = nn.Linear(hidden_size, num_actions)
        self.critic = nn.Linear(hidden_size, 1)

    def features(self, obs, last_reward):
        """x = [stem(one-hot view, or the masked vector) ; clip(last reward)], for any leading dims of obs."""
        dtype = self.critic.weight.dtype
        y = self.stem(one_hot_view(obs, dtype) if self.symbolic else obs.to(dtype))
        return torch.cat([y, last_reward.clamp(-1, 1).unsqueeze(-1).to(y.dtype)], -1)

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

    obs: torch.Tensor  # T x B x OBS_SIZE, uint8 (MiniGrid), or T x B x kept entries (classic control)
    last_rewards: torch.Tensor  # T x B, the reward input of each step
    firsts: torch.Tensor  # T x B, reset state and sensitivities before the step
    deads: torch.Tensor  # T x B, the observation is terminal: no loss, its value bootstraps
    actions: torch.Tensor  # T x B
    rewards: torch.Tensor  # T x B
    terms: torch.Tensor  # T x B, the step ended its episode (no bootstrap)
    values: torch.Tensor  # T x B
    features: torch.Tensor | None = None  # T x B x D with their graph; None: recompute in the update


def n_step_returns(rollout, next_value, gamma):
    """G_t = clip(r_t) + gamma G_{t+1}, cut by terminations; a dead step's G is its value (Method §6:
    a truncated episode bootstraps from its terminal observation)."""
    returns = torch.empty_like(rollout.values)
    g = next_value
    for t in reversed(range(len(returns))):
        g = rollout.rewards[t].clamp(-1, 1) + torch.where(rollout.terms[t], 0.0, gamma * g)
        g = torch.where(rollout.deads[t], rollout.values[t], g)
        returns[t] = g
    return returns


def timer(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # otherwise we would time kernel launches, not work
    return time.perf_counter()


def rollout_loss(agent, rollout, returns, x, c, args):
    """The A2C loss summed over time and batch (Method §5), and its parts for logging."""
    logits, value = agent.heads(x, c)
    dist = torch.distributions.Categorical(logits=logits)
    live = (~rollout.deads).to(value.dtype)
    advantages = (returns - value).detach()
    pg_loss = -(live * dist.log_prob(rollout.actions) * advantages).sum()
    v_loss = 0.5 * (live * (returns - value) ** 2).sum()
    entropy = (live * dist.entropy()).sum()
    loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy
    return loss, {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.item()}


def compute_gradients(agent, rollout, returns, c0, sens0, args):
    """Fill every parameter's .grad for one rollout's loss; return (stats, sens_T, seconds in RTRL).

    rtrl: the eLSTM gets exact untruncated gradients from the carried sensitivities, and the stem its
    gradient through the cell within the rollout from the same pass (rtrl_scan); stem, gate and heads
    get backprop (Method §5). tbptt / lstm / ff: autograd within the rollout.
    """
    resets = agent.resets(rollout.firsts)
    x = agent.features(rollout.obs, rollout.last_rewards) if rollout.features is None else rollout.features
    x_leaf = x.detach().requires_grad_()
    rtrl_time, sens_T = 0.0, sens0
    if args.core == "rtrl":
        scan = agent.cell.scan(x_leaf.detach(), c0, resets)
        c_leaf = scan[0].requires_grad_()  # its grad is the local delta_t = dL/dc_t (Method §2)
        loss, stats = rollout_loss(agent, rollout, returns, x_leaf, c_leaf, args)
        loss.backward()
        start = timer(x.device)
        grads, sens_T, dl_dx = agent.cell.rtrl_scan(
            x_leaf.detach(), scan, sens0, c_leaf.grad, args.rtrl_impl, overwrite=True
        )  # sens0 is not used again
        rtrl_time = timer(x.device) - start
        for name, p in agent.cell.named_parameters():
            p.grad = grads[name]
        x.backward(x_leaf.grad + dl_dx)
    else:
        loss, stats = rollout_loss(agent, rollout, returns, x_leaf, agent.cell(x_leaf, c0, resets), args)
        loss.backward()
        x.backward(x_leaf.grad)
    return stats, sens_T, rtrl_time


# ---------------------------------------------------------------------------------------------
# Diagnostics: how far the update's eLSTM gradient is from the exact one at the current parameters
# ---------------------------------------------------------------------------------------------
class EpisodeHistory:
    """Each env's observations since its episode started, up to the current rollout (for --staleness-every)."""

    def __init__(self, num_envs):
        self.obs, self.last_rewards = [None] * num_envs, [None] * num_envs

    def extend(self, rollout):
        for b in range(rollout.obs.shape[1]):
            starts = torch.nonzero(rollout.firsts[:, b]).flatten()
            keep = slice(int(starts[-1]) if len(starts) else 0, None)
            old = (self.obs[b], self.last_rewards[b]) if not len(starts) else (None, None)
            new = (rollout.obs[keep, b], rollout.last_rewards[keep, b])
            self.obs[b], self.last_rewards[b] = (n if o is None else torch.cat([o, n]) for o, n in zip(old, new))

    def padded(self, rollout):
        """Every env's episode so far then the rollout, left-padded to one length L + T, and the reset mask."""
        lengths = [0 if o is None else len(o) for o in self.obs]
        L = max(lengths)
        obs = rollout.obs.new_zeros(L, *rollout.obs.shape[1:])
        last_rewards = rollout.last_rewards.new_zeros(L, rollout.obs.shape[1])
        firsts = torch.ones(L, rollout.obs.shape[1], dtype=torch.bool, device=rollout.obs.device)
        for b, n in enumerate(lengths):
            if n:
                obs[L - n :, b], last_rewards[L - n :, b], firsts[L - n + 1 :, b] = self.obs[b], self.last_rewards[b], False
        cat = torch.cat
        return cat([obs, rollout.obs]), cat([last_rewards, rollout.last_rewards]), cat([firsts, rollout.firsts]), L


def gradient_staleness(agent, history, rollout, returns, args):
    """Cosine and relative error of the update's eLSTM gradient (already in .grad) against the exact
    gradient of the same rollout loss at the current parameters, by BPTT through each episode so far;
    also the cosine of the gradient truncated at the rollout's start (TBPTT's), at the same parameters."""
    obs, last_rewards, firsts, L = history.padded(rollout)
    params = list(agent.cell.parameters())
    with torch.no_grad():
        x = agent.features(obs, last_rewards)
    c = agent.cell(x, x.new_zeros(x.shape[1], params[0].shape[0]), firsts)
    c_truncated = agent.cell(x[L:], c[L - 1].detach() if L else c.new_zeros(c.shape[1:]), rollout.firsts)
    exact, truncated = (
        torch.cat(
            [g.flatten() for g in torch.autograd.grad(rollout_loss(agent, rollout, returns, x[L:], cs, args)[0], params)]
        )
        for cs in (c[L:], c_truncated)
    )
    used = torch.cat([p.grad.flatten() for p in params])
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0).item()
    return {
        "cos_update_exact": cos(used, exact),
        "relerr_update_exact": ((used - exact).norm() / exact.norm()).item(),
        "cos_truncated_exact": cos(truncated, exact),
        "episode_prefix_steps": float(L),
    }


def grad_norms(agent):
    """Per-group gradient norms before clipping: the untruncated eLSTM gradient can dominate the global norm."""
    groups = {"stem": [agent.stem], "cell": [agent.cell], "heads": [agent.gate, agent.actor, agent.critic]}
    norms = {}
    for name, modules in groups.items():
        grads = [p.grad for m in modules if m is not None for p in m.parameters() if p.grad is not None]
        norms[name] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0
    return norms


def env_seeds(seed, n):
    """Distinct per-env seeds derived from --seed (Method §6)."""
    return np.random.default_rng(seed).choice(2**31 - 1, size=n, replace=False)


@torch.no_grad()
def evaluate(agent, env_id, seeds, device, actions):
    """Greedy (return, success) of one episode on each of len(seeds) fresh environments: every env plays
    the same number of episodes, so short episodes do not crowd out long ones."""
    envs = Envs(env_id, seeds, device, actions)
    c, _ = agent.cell.initial_state(len(seeds))
    finished = {}
    while len(finished) < len(seeds):
        action, _, c = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first, greedy=True)
        for i, episode_return, _, success in envs.step(action)[2]:
            finished.setdefault(i, (episode_return, success))
    envs.close()
    return [finished[i] for i in range(len(seeds))]


def pick_device(args):
    """The device and the line that names it, printed and logged at start: a fallback to the CPU is never silent
    (a torch CUDA build that does not match the driver finds no device)."""
    if args.cuda and torch.cuda.is_available():
        device = torch.device("cuda:0")
        return device, f"device: cuda:0 ({torch.cuda.get_device_name(device)}, torch CUDA {torch.version.cuda})"
    return torch.device("cpu"), ("device: cpu (--cuda: no CUDA device found)" if args.cuda else "device: cpu")


def save_checkpoint(agent, args, path, **extra):
    """Atomic: a crash mid-write never leaves a truncated file behind, and the previous one stays until the new
    one is complete. `extra` makes it a checkpoint to resume from (see training_state)."""
    tmp = f"{path}.tmp"
    checkpoint = {"script": os.path.basename(__file__), "model": agent.state_dict(), "args": vars(args), **extra}
    torch.save(to_cpu(checkpoint), tmp)
    os.replace(tmp, path)


def to_cpu(obj):
    """CPU copies of every tensor in a checkpoint (the optimizer state's too): a file written on a GPU loads on a
    machine without one; loading maps to the CPU and load_state_dict copies onto the agent's device."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state dict's per-module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def training_state(optimizer, run_name, iteration, global_step):
    """What --resume restores besides the model. Not (c, sens) nor the environments: EnvPool cannot snapshot an
    episode, so a resumed run starts new episodes, and a state belongs only to the episode that made it."""
    np_state = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return dict(optimizer=optimizer.state_dict(), run_name=run_name, iteration=iteration, global_step=global_step, rng=rng)


RESUME_KEYS = {"script", "model", "args", "optimizer", "run_name", "iteration", "global_step", "rng"}
# flags a resumed run may change; any other must equal the checkpoint's
RESUME_MAY_CHANGE = {
    "total_timesteps",
    "checkpoint_every",
    "resume",
    "save_model",
    "eval_episodes",
    "cuda",
    "batch_size",
    "num_iterations",
}


def load_resume(args):
    """The checkpoint --resume names, checked against this command before anything is made; None without --resume."""
    if not args.resume:
        return None
    try:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"--resume: no such file {args.resume!r}")
    except Exception as e:  # truncated, corrupt, or not written by torch.save
        fail(f"--resume: {args.resume!r} is not a readable checkpoint ({type(e).__name__}: {str(e).split('. ')[0][:120]})")
    if not isinstance(checkpoint, dict) or not RESUME_KEYS <= set(checkpoint):
        missing = sorted(RESUME_KEYS - set(checkpoint)) if isinstance(checkpoint, dict) else sorted(RESUME_KEYS)
        fail(
            f"--resume: {args.resume!r} is not a checkpoint to resume from (no {', '.join(missing)}; "
            "model.pt from --save-model holds weights only)"
        )
    if checkpoint["script"] != os.path.basename(__file__):
        fail(f"--resume: {args.resume!r} was written by {checkpoint['script']}, not {os.path.basename(__file__)}")
    ours, theirs = vars(args), checkpoint["args"]
    ours = {**ours, "run_name": ours["run_name"] or theirs.get("run_name")}  # left out, it is the checkpoint's
    differ = [
        f"--{k.replace('_', '-')} {ours[k]} (checkpoint: {theirs.get(k)})"
        for k in ours
        if k not in RESUME_MAY_CHANGE and ours[k] != theirs.get(k)
    ]
    if differ:
        fail(f"--resume: this command differs from the checkpoint's run: {', '.join(differ)}")
    if args.total_timesteps < checkpoint["global_step"]:
        fail(f"--resume: --total-timesteps {args.total_timesteps} is below the checkpoint's step {checkpoint['global_step']}")
    return checkpoint


def restore(checkpoint, agent, optimizer):
    """Load what training_state saved (the RNG states last: nothing may draw after them); returns (iteration, step)."""
    try:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"--resume: the checkpoint does not fit this agent ({str(e).splitlines()[0][:160]})")
    rng = checkpoint["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return checkpoint["iteration"], checkpoint["global_step"]


class Progress:
    """The progress line's clock, every 10 s: the elapsed time and an ETA from the steps/s of the last minute."""

    def __init__(self, step, total_steps):
        self.start, self.total_steps, self.last_line = time.time(), total_steps, 0.0
        self.marks = [(self.start, step)]  # (time, step) at each line; the last 7 span about a minute

    def due(self):
        return time.time() - self.last_line > 10

    def __call__(self, step):
        self.last_line = now = time.time()
        self.marks = (self.marks + [(now, step)])[-7:]
        (then, step_then), rate = self.marks[0], 0.0
        if now > then:
            rate = (step - step_then) / (now - then)
        left = (self.total_steps - step) / rate if rate > 0 else float("inf")
        return f"elapsed={duration(now - self.start)} eta={duration(left)}"


def duration(seconds):
    """12s, 4m09s, 10h31m; ? while no step has been timed."""
    if seconds == float("inf"):
        return "?"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StopSignals:
    """Ctrl-C / SIGTERM: recorded, so that the loop can finish its update, checkpoint and exit 128 + signum."""

    def __init__(self):
        self.signum = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._record)

    def _record(self, signum, frame):
        self.signum = signum

    def restore(self):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    resumed = load_resume(args)
    if resumed:  # the logs go on in the checkpoint's run directory
        run_name = resumed["run_name"]
        writer = SummaryWriter(f"runs/{run_name}", purge_step=resumed["global_step"] + 1)  # drops what came after it
    else:
        run_name = (
            args.run_name or f"{args.env_id}__{args.exp_name}__{args.core}__T{args.num_steps}__{args.seed}__{int(time.time())}"
        )
        if os.path.exists(f"runs/{run_name}"):
            fail(f"runs/{run_name} exists; a run directory is never shared by two runs")
        writer = SummaryWriter(f"runs/{run_name}")
    args.run_name = run_name  # saved with the args: a resumed run finds its directory
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device, device_line = pick_device(args)
    print(device_line, flush=True)
    writer.add_text("device", device_line)
    # the float32 agreement of RTRL and BPTT (README) needs full-precision GEMMs: TF32 keeps 10 mantissa bits and
    # the cell's reductions over T*B lose about three digits. Only matmuls: cuDNN's convolutions may use TF32.
    torch.backends.cuda.matmul.allow_tf32 = False

    seeds = env_seeds(args.seed, args.num_envs + max(args.eval_episodes, 1))
    # resumed: new episodes from new seeds, not a replay of the run's start (evaluation keeps the run's own)
    train_seeds = env_seeds([args.seed, resumed["global_step"]], args.num_envs) if resumed else seeds[: args.num_envs]
    envs = Envs(args.env_id, train_seeds, device, args.actions)
    agent = Agent(envs.obs_shape, envs.num_actions, args.hidden_size, args.core).to(device)
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)
    start_iteration, global_step = restore(resumed, agent, optimizer) if resumed else (0, 0)
    if resumed:
        print(
            f"resumed runs/{run_name} at global_step={global_step}: every environment starts a new episode, "
            "recurrent state and sensitivities zero"
        )
    checkpoint_path, next_checkpoint = f"runs/{run_name}/checkpoint.pt", global_step + args.checkpoint_every
    stop = StopSignals()

    T, B = args.num_steps, args.num_envs
    rollout = Rollout(
        obs=torch.zeros((T, B, *envs.obs_shape), dtype=envs.obs.dtype, device=device),
        last_rewards=torch.zeros((T, B), device=device),
        firsts=torch.zeros((T, B), dtype=torch.bool, device=device),
        deads=torch.zeros((T, B), dtype=torch.bool, device=device),
        actions=torch.zeros((T, B), dtype=torch.long, device=device),
        rewards=torch.zeros((T, B), device=device),
        terms=torch.zeros((T, B), dtype=torch.bool, device=device),
        values=torch.zeros((T, B), device=device),
    )
    c, sens = agent.cell.initial_state(B)
    history = EpisodeHistory(B) if args.staleness_every else None
    start_step, start_time, recent = global_step, time.time(), []
    progress = Progress(global_step, args.num_iterations * B * T)

    for iteration in range(start_iteration + 1, args.num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

        c0 = c
        for step in range(T):
            global_step += B
            rollout.obs[step], rollout.last_rewards[step] = envs.obs, envs.last_reward
            rollout.firsts[step], rollout.deads[step] = envs.first, envs.dead
            with torch.no_grad():  # a small stem: one batched forward in the update beats T kept graphs
                x = agent.features(envs.obs, envs.last_reward)
            action, rollout.values[step], c = agent.act(x, c, envs.first)
            rollout.actions[step] = action
            rollout.rewards[step], rollout.terms[step], episodes = envs.step(action)
            for _, episode_return, episode_length, success in episodes:
                writer.add_scalar("charts/episodic_return", episode_return, global_step)
                writer.add_scalar("charts/episodic_length", episode_length, global_step)
                writer.add_scalar("charts/success", float(success), global_step)
                recent = (recent + [(episode_return, success)])[-100:]

        update_start = timer(device)
        with torch.no_grad():  # c itself moves on in the next rollout
            next_value = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first)[1]
        returns = n_step_returns(rollout, next_value, args.gamma)
        optimizer.zero_grad()
        stats, sens, rtrl_time = compute_gradients(agent, rollout, returns, c0, sens, args)
        if history is not None and iteration % args.staleness_every == 0:
            for key, value in gradient_staleness(agent, history, rollout, returns, args).items():
                writer.add_scalar(f"diag/{key}", value, global_step)
        for key, value in grad_norms(agent).items():
            writer.add_scalar(f"losses/grad_norm_{key}", value, global_step)
        grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        optimizer.step()
        if history is not None:
            history.extend(rollout)
        update_time = timer(device) - update_start

        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for key, value in stats.items():
            writer.add_scalar(f"losses/{key}", value, global_step)
        writer.add_scalar("losses/grad_norm", grad_norm.item(), global_step)
        writer.add_scalar("charts/rtrl_share_of_update", rtrl_time / update_time, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if progress.due() or iteration == args.num_iterations:
            summary = (
                f"{np.mean([r for r, _ in recent]):.3f} success {np.mean([s for _, s in recent]):.2f}" if recent else "n/a"
            )
            print(
                f"global_step={global_step} SPS={sps} {progress(global_step)} "
                f"return(last {len(recent)} episodes)={summary} entropy={stats['entropy'] / (T * B):.3f}",
                flush=True,
            )
        if stop.signum or (args.checkpoint_every and global_step >= next_checkpoint):
            save_checkpoint(agent, args, checkpoint_path, **training_state(optimizer, run_name, iteration, global_step))
            next_checkpoint = global_step + args.checkpoint_every
        if stop.signum:
            envs.close()
            writer.close()
            print(
                f"stopped by {signal.Signals(stop.signum).name} at global_step={global_step}; checkpoint: "
                f"{checkpoint_path} (continue with --resume {checkpoint_path})",
                flush=True,
            )
            sys.exit(128 + stop.signum)
    envs.close()
    stop.restore()  # Ctrl-C during the evaluation below stops it at once
    if args.checkpoint_every:
        final = max(start_iteration, args.num_iterations)
        save_checkpoint(agent, args, checkpoint_path, **training_state(optimizer, run_name, final, global_step))

    if args.save_model:
        model_path = f"runs/{run_name}/model.pt"
        save_checkpoint(agent, args, model_path)
        print(f"model saved to {model_path}")
    if args.eval_episodes > 0:
        results = evaluate(agent, args.env_id, seeds[args.num_envs :][: args.eval_episodes], device, args.actions)
        for i, (eval_return, success) in enumerate(results):
            writer.add_scalar("eval/episodic_return", eval_return, i)
            writer.add_scalar("eval/success", float(success), i)
        print(
            f"greedy evaluation over {len(results)} episodes: mean return {np.mean([r for r, _ in results]):.3f}, "
            f"success {np.mean([s for _, s in results]):.2f}"
        )
    writer.close()
