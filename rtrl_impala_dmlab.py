"""IMPALA (V-trace) with an element-wise LSTM trained by exact real-time recurrent learning (RTRL).

Irie, Gopalakrishnan, Schmidhuber, "Exploring the Promise and Limits of Real-Time Recurrent
Learning", ICLR 2024 (arXiv 2305.19044), their R2AC on DeepMind Lab; Espeholt et al., "IMPALA",
ICML 2018 (arXiv 1802.01561) for V-trace. Actor processes step their environments with a copy
of the latest weights and carry the eLSTM state *and* its RTRL sensitivities online; the learner
recomputes each unroll's sensitivities from the actor's ones with its own parameters, so the
recurrent parameters get untruncated gradients with no stored history.

    python rtrl_impala_dmlab.py --env-id rooms_watermaze          # needs deepmind_lab, built from source
    python rtrl_impala_dmlab.py --env-id rooms_watermaze --core rtrl --init-stem-from PRETRAINED.pt --freeze-stem
    python rtrl_impala_dmlab.py --env-id MyWayHome-v1             # pip-installable stand-in (EnvPool ViZDoom)
    torchrun --nproc_per_node 2 rtrl_impala_dmlab.py --env-id MyWayHome-v1 --num-actors 4
    python rtrl_impala_dmlab.py --resume runs/NAME/checkpoint.pt   # after Ctrl-C or a crash: the run goes on

The learner takes the oldest waiting unrolls first (FIFO); charts/unroll_age logs, in seconds, how long before
its update the oldest unroll of each batch was finished, charts/policy_lag how many updates its weights were behind.
"""

import collections
import contextlib
import difflib
import hashlib
import multiprocessing.connection
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import envpool
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
    """whether to save the model and its args to `runs/{run_name}/model.pt` at the end of training"""
    checkpoint_every: int = 0
    """agent steps between checkpoints, written atomically to `runs/{run_name}/checkpoint.pt` (0 = none); one is
    also written at the end when this is set, and always on Ctrl-C / SIGTERM"""
    resume: str = ""
    """a checkpoint.pt to continue, alone: its run's flags are the defaults, flags given here win (--total-timesteps,
    --learning-rate, ...); model, optimizer, update and step are restored and the run directory's logs go on; the
    actors start new episodes, with zero recurrent state and sensitivities, from seeds of (seed, step)"""

    # Algorithm specific arguments
    env_id: str = "rooms_watermaze"
    """a DMLab-30 level name (needs `deepmind_lab`) or an EnvPool pixel task id such as MyWayHome-v1 (the stand-in)"""
    total_timesteps: int = 300_000_000
    """total agent steps (each is 4 frames) learned from, over all learners; 300 M steps = 1.2 B frames"""
    num_actors: int = os.cpu_count() or 1
    """actor processes per learner (per torchrun rank)"""
    envs_per_actor: int = 1
    """environments each actor steps as one batch"""
    unroll_length: int = 100
    """T, the steps per unroll an actor sends (plus one bootstrap step)"""
    batch_size: int = 32
    """unrolls per update of each learner"""
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
    hidden_size: int = 512
    """N, the size of the recurrent state (eLSTM c; for lstm, h and c each)"""
    core: Literal["rtrl", "tbptt", "lstm", "ff"] = "rtrl"
    """rtrl: eLSTM with exact untruncated RTRL gradients; tbptt: the same eLSTM with BPTT cut at each
    unroll's start; lstm: a standard LSTM with BPTT cut the same way; ff: no memory (the eLSTM with its
    state zeroed at every step)"""
    rtrl_impl: Literal["chunked", "step"] = "chunked"
    """the learner's exact RTRL in one GEMM-shaped pass per unroll (chunked) or by the per-step recursion (step):
    same numbers; with --freeze-stem, step is Method §2's forward recursion alone, nothing going backward in time"""
    init_stem_from: str = ""
    """a model.pt of this script (any core): start from its stem, every `stem.*` parameter, i.e. everything
    before the cell (the IMPALA ResNet's convolutions and the Linear layer after them); cell and heads start fresh"""
    freeze_stem: bool = False
    """the stem gets no gradient and no update (the paper's --freeze_conv --freeze_fc); rtrl then makes no autograd
    pass through the cell or stem (see compute_gradients); without --init-stem-from the stem stays at its
    random initialization (a random-features baseline)"""
    eval_episodes: int = 10
    """greedy evaluation episodes after training, on min(this, 8) fresh envs that each play a quota fixed before
    play (this // envs, one more for the first this % envs); 0 skips it. DMLab evaluates on the held-out `_test`
    variant of a level where DMLab-30 has one, with allowHoldOutLevels and a fixed mixerSeed"""
    dmlab_dataset_path: str = ""
    """DMLab's `datasetPath`: the directory of the Brady, Konkle & Oliva (2008) images that
    psychlab_arbitrary_visuomotor_mapping and psychlab_continuous_recognition need"""
    actor_timeout: float = 60.0
    """seconds: an actor the learner waits on that sends nothing for max(this, 10x the median unroll time) is
    taken as hung, its process group killed and the actor restarted (a first unroll gets ACTOR_STARTUP_SECONDS)"""

    # to be filled in runtime
    num_updates: int = 0
    """the number of learner updates (computed in runtime)"""
    world_size: int = 1
    """the number of learners, torchrun's WORLD_SIZE (computed in runtime)"""


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


class OnlineELSTM(ELSTM):
    """The ELSTM plus RTRL forward in time (Method §2), as the actors run it: c and its sensitivities advance
    together at every environment step, and the learner's rtrl_scan starts from what they carried. With a
    frozen stem and --rtrl-impl step the learner runs it too (rtrl_forward): nothing then goes backward in time."""

    @torch.no_grad()
    def scan_with_increments(self, x, c0, done):
        """c_1..c_T, a_t = notdone_t * J_t and the increments u_t of every parameter's sensitivity (Method §2)."""
        cs, c_prev, z, f, notdone = self._scan(x, c0, done)
        c, c_prev, z, f = torch.stack(cs), torch.stack(c_prev), torch.stack(z), torch.stack(f)
        one_minus_f = 1 - f
        alpha = one_minus_f * (1 - z * z)  # dc_t / d pre-activation of z
        beta = (c_prev - z).mul_(f).mul_(one_minus_f)  # dc_t / d pre-activation of f
        a = torch.addcmul(f, alpha, self.v_z).addcmul_(beta, self.v_f).mul_(notdone)  # J_t, zeroed across resets
        u = {"w_z": alpha, "w_f": beta, "v_z": alpha * c_prev, "v_f": beta * c_prev, "b_z": alpha, "b_f": beta}
        return c, a, u

    def _sens_step(self, sens, a, u, x, in_place=False):
        """Method §2, one step: S_t = J_t * S_{t-1} + u_t (x) x_t (the outer product for the matrices only); over
        `sens`' own tensors if in_place (the B x N x D ones are then read and written once, with no temporary)."""
        sens = sens if in_place else {k: s.clone() for k, s in sens.items()}
        return {
            k: s.mul_(a[:, :, None]).addcmul_(u[k][:, :, None], x[:, None, :]) if k in self.MATRICES else s.mul_(a).add_(u[k])
            for k, s in sens.items()
        }

    @torch.no_grad()
    def step(self, x, c, done, sens):
        """One environment step online, as the actors run it: (c_t, sens_t) from (c_{t-1}, sens_{t-1}); x: B x D.

        Out of place: the actor sends the sensitivities it had at an unroll's start after the unroll."""
        c, a, u = self.scan_with_increments(x[None], c, done[None])
        return c[0], self._sens_step(sens, a[0], {k: v[0] for k, v in u.items()}, x)

    @torch.no_grad()
    def rtrl_forward(self, x, a, u, sens, dl_dc):
        """Exact gradients of sum_t <dl_dc[t], c_t> (and sens_T) from scan_with_increments' a and u, by Method §2's
        recursion alone: S_t = J_t * S_{t-1} + u_t (x) x_t, grad += sum_b delta_t * S_t. Unlike rtrl_scan (whose
        R_t runs from T back to 1, Method §3), nothing here goes backward in time; it gives no dL/dx."""
        grads = {k: torch.zeros_like(p) for k, p in self.named_parameters()}
        for t in range(len(dl_dc)):
            sens = self._sens_step(sens, a[t], {k: v[t] for k, v in u.items()}, x[t], in_place=t > 0)
            for k, s in sens.items():
                if k in self.MATRICES:  # sum_b as one batched GEMM over n that reads S_t where it lies
                    grads[k] += torch.bmm(dl_dc[t].T.unsqueeze(1), s.transpose(0, 1)).squeeze(1)
                else:
                    grads[k] += (dl_dc[t] * s).sum(0)
        return grads, sens


class LSTM(nn.Module):
    """The conventional baseline (`--core lstm`): a standard LSTM, its state [h ; c] kept as one B x 2N
    tensor so that it travels through actors and learner like the eLSTM's c, reset where `done` is set."""

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

    @torch.no_grad()
    def step(self, x, state, done, sens):
        """One environment step, as OnlineELSTM.step; BPTT within the unroll needs no sensitivities: `sens` is {}."""
        return self(x[None], state, done[None])[0], sens


# ---------------------------------------------------------------------------------------------
# The agent (Method §5): IMPALA ResNet stem -> [features ; clipped last reward] -> eLSTM -> heads
# ---------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


def conv_sequence(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ResidualBlock(out_channels),
        ResidualBlock(out_channels),
    )


class Agent(nn.Module):
    def __init__(self, obs_shape, num_actions, hidden_size, core="rtrl", freeze_stem=False):
        super().__init__()
        self.core = core
        convs = nn.Sequential(conv_sequence(obs_shape[0], 16), conv_sequence(16, 32), conv_sequence(32, 32))
        with torch.no_grad():
            flat = convs(torch.zeros(1, *obs_shape)).numel()
        self.stem = nn.Sequential(convs, nn.ReLU(), nn.Flatten(), nn.Linear(flat, 256), nn.ReLU())
        self.stem.to(memory_format=torch.channels_last)  # NHWC: CPU (oneDNN) convolutions run ~1.6x faster
        self.stem.requires_grad_(not freeze_stem)  # frozen: its output has no graph, so nothing flows back into it
        self.cell = LSTM(256 + 1, hidden_size) if core == "lstm" else OnlineELSTM(256 + 1, hidden_size)
        # the eLSTM's output gate (Method §1); the LSTM has its own
        self.gate = None if core == "lstm" else nn.Linear(256 + 1 + hidden_size, hidden_size)
        self.actor = nn.Linear(hidden_size, num_actions)
        self.critic = nn.Linear(hidden_size, 1)

    def features(self, obs, last_reward):
        """x = [stem(obs) ; clip(last reward)], for any leading dims of obs (... x C x H x W)."""
        lead = obs.shape[:-3]
        y = self.stem(obs.reshape(-1, *obs.shape[-3:]).to(self.critic.weight.dtype) / 255.0)
        return torch.cat([y.reshape(*lead, -1), last_reward.clamp(-1, 1).unsqueeze(-1).to(y.dtype)], -1)

    def initial_state(self, batch_size):
        """(c, sens) at an episode's start: zero state and, for rtrl, zero sensitivities (Method §2). The other cores
        use none and carry an empty dict through the same code: zeros would cost an actor two passes over B x N x D
        per step, and the pipe 2ND floats per env and unroll (1 MB at N = 512, D = 257), for nothing."""
        c, sens = self.cell.initial_state(batch_size)
        return c, sens if self.core == "rtrl" else {}

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
    def act(self, obs, last_reward, c, first, sens, greedy=False):
        """One environment step of the policy: (action, logits, next c, next sens). The RTRL sensitivities in
        `sens` advance with the state (Method §2), as the actors carry them; an empty dict carries none."""
        x = self.features(obs, last_reward)
        c, sens = self.cell.step(x, c, self.resets(first), sens)
        logits, _ = self.heads(x, c)
        action = logits.argmax(-1) if greedy else torch.distributions.Categorical(logits=logits).sample()
        return action, logits, c, sens


# ---------------------------------------------------------------------------------------------
# The learner: V-trace and the RTRL update
# ---------------------------------------------------------------------------------------------
def vtrace(rewards, values, bootstrap_value, log_rhos, discounts, terminal_obs, rho_bar=1.0, c_bar=1.0):
    """V-trace targets v_s and policy-gradient advantages (Espeholt et al. 2018, eq. 1 and Sec. 4.2), T x B.

    v_s = V_s + delta_s + discounts_s c_s (v_{s+1} - V_{s+1}),  delta_s = rho_s (r_s + discounts_s V_{s+1} - V_s),
    rho_s = min(rho_bar, pi/mu), c_s = min(c_bar, pi/mu); discounts_s = gamma, or 0 where step s ended its
    episode. A step that takes a terminal observation (Method §6) keeps v_s = V_s, so a truncation bootstraps from it.
    """
    live = (~terminal_obs).to(values.dtype)
    ratios = log_rhos.exp()
    rhos, cs = ratios.clamp(max=rho_bar) * live, ratios.clamp(max=c_bar) * live
    next_values = torch.cat([values[1:], bootstrap_value[None]])
    deltas = rhos * (rewards + discounts * next_values - values)
    vs_minus_v = torch.empty_like(values)
    acc = torch.zeros_like(bootstrap_value)
    for t in reversed(range(len(values))):
        acc = deltas[t] + discounts[t] * cs[t] * acc
        vs_minus_v[t] = acc
    vs = values + vs_minus_v
    next_vs = torch.cat([vs[1:], bootstrap_value[None]])
    return vs, rhos * (rewards + discounts * next_vs - values)


def to_device(batch, device):
    """The learner's copy of a batch: its tensors and the sensitivities' dict."""
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    moved["sens0"] = {k: s.to(device) for k, s in batch["sens0"].items()}
    return moved


def unroll_loss(agent, batch, x, c, args):
    """The V-trace actor-critic loss of T + 1 steps' features and states, summed over time and batch (Method §5),
    and its parts for logging. Step T only bootstraps (its loss is the next unroll's)."""
    T = args.unroll_length
    logits, values = agent.heads(x, c)
    logits, values, bootstrap_value = logits[:T], values[:T], values[T].detach()
    policy = torch.distributions.Categorical(logits=logits)
    log_pi = policy.log_prob(batch["actions"])
    log_mu = torch.distributions.Categorical(logits=batch["logits"].to(logits.dtype)).log_prob(batch["actions"])
    with torch.no_grad():
        discounts = args.gamma * (~batch["terms"]).to(values.dtype)
        rewards = batch["rewards"].to(values.dtype).clamp(-1, 1)
        vs, pg_advantages = vtrace(rewards, values, bootstrap_value, log_pi - log_mu, discounts, batch["terminal_obs"][:T])
    live = (~batch["terminal_obs"][:T]).to(values.dtype)
    pg_loss = -(live * log_pi * pg_advantages).sum()
    v_loss = 0.5 * (live * (vs - values) ** 2).sum()
    entropy = (live * policy.entropy()).sum()
    loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy
    return loss, {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.item()}


def compute_gradients(agent, batch, args):
    """Fill every trained parameter's .grad for one batch of unrolls (T + 1 steps x B); return the loss's parts.

    rtrl: the eLSTM gets exact untruncated gradients from the actors' carried sensitivities, recomputed over
    the unroll with the learner's parameters, and the stem its gradient through the cell within the unroll from
    the same pass (rtrl_scan); stem, gate and heads get backprop (Method §5). With a frozen stem the only
    backward pass is the heads', step by step, and the stem gets nothing; --rtrl-impl step then runs Method §2's
    recursion alone (rtrl_forward: nothing in it goes backward in time), chunked the same gradients faster
    (its R_t sums the unroll's steps from T back to 1, Method §3). tbptt / lstm / ff: autograd within the unroll.
    """
    T = args.unroll_length
    resets = agent.resets(batch["firsts"])
    stem_learns = any(p.requires_grad for p in agent.stem.parameters())
    x = agent.features(batch["obs"], batch["last_rewards"])  # no graph when the stem is frozen
    x_leaf = x.detach().requires_grad_(stem_learns)
    if args.core == "rtrl":
        forward_only = not stem_learns and args.rtrl_impl == "step"
        if forward_only:
            c_leaf, a, u = agent.cell.scan_with_increments(x_leaf, batch["c0"], resets)
            c_leaf.requires_grad_()
        else:
            scan = agent.cell.scan(x_leaf.detach(), batch["c0"], resets)
            c_leaf = scan[0].requires_grad_()  # its grad is the local delta_t = dL/dc_t (Method §2)
        loss, stats = unroll_loss(agent, batch, x_leaf, c_leaf, args)
        loss.backward()
        if forward_only:
            u = {k: v[:T] for k, v in u.items()}
            grads, _ = agent.cell.rtrl_forward(x_leaf[:T], a[:T], u, batch["sens0"], c_leaf.grad[:T])
        else:
            unroll = tuple(v[:T] for v in scan)  # step T has no loss: nothing flows back through it
            grads, _, dl_dx = agent.cell.rtrl_scan(
                x_leaf[:T].detach(), unroll, batch["sens0"], c_leaf.grad[:T], args.rtrl_impl, overwrite=True
            )
            if stem_learns:
                x_leaf.grad[:T] += dl_dx
        for name, p in agent.cell.named_parameters():
            p.grad = grads[name]
    else:
        loss, stats = unroll_loss(agent, batch, x_leaf, agent.cell(x_leaf, batch["c0"], resets), args)
        loss.backward()
    if stem_learns:
        x.backward(x_leaf.grad)
    return stats


def all_reduce_gradients(params, stop):
    """Sum every learner's gradients in one flat all-reduce (the update of one learner with the whole global
    batch, as the losses are sums); a stop request from any rank rides along so that all ranks stop together."""
    flat = torch.cat([p.grad.flatten() for p in params] + [torch.tensor([float(stop)], device=params[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[-1].item() > 0


# ---------------------------------------------------------------------------------------------
# Environments: DeepMind Lab, or an EnvPool pixel task as a pip-installable stand-in
# ---------------------------------------------------------------------------------------------
DMLAB30 = tuple(
    """rooms_collect_good_objects_train rooms_exploit_deferred_effects_train rooms_select_nonmatching_object
    rooms_watermaze rooms_keys_doors_puzzle language_select_described_object language_select_located_object
    language_execute_random_task language_answer_quantitative_question lasertag_one_opponent_small
    lasertag_three_opponents_small lasertag_one_opponent_large lasertag_three_opponents_large natlab_fixed_large_map
    natlab_varying_map_regrowth natlab_varying_map_randomized skymaze_irreversible_path_hard
    skymaze_irreversible_path_varied psychlab_arbitrary_visuomotor_mapping psychlab_continuous_recognition
    psychlab_sequential_comparison psychlab_visual_search explore_object_locations_small explore_object_locations_large
    explore_obstructed_goals_small explore_obstructed_goals_large explore_goal_locations_small
    explore_goal_locations_large explore_object_rewards_few explore_object_rewards_many""".split()
)
# Evaluation as DeepMind's scalable_agent does it: the held-out variant where DMLab-30 defines one, hold-out levels
# allowed and a fixed mixerSeed (XOR'd into every reset seed: other layouts than training's), so that scores
# compare with published ones
DMLAB30_TEST_LEVELS = {
    "rooms_collect_good_objects_train": "rooms_collect_good_objects_test",
    "rooms_exploit_deferred_effects_train": "rooms_exploit_deferred_effects_test",
}
DMLAB_EVAL_CONFIG = {"allowHoldOutLevels": "true", "mixerSeed": str(0x600D5EED)}
# the levels whose factories load the Brady, Konkle & Oliva (2008) images (datasets/brady_konkle_oliva2008.lua)
DMLAB_NEEDS_DATASET = ("psychlab_arbitrary_visuomotor_mapping", "psychlab_continuous_recognition")
# IMPALA's 9 actions for DMLab (Espeholt et al. 2018, appendix), by DMLab action name; unnamed ones are 0
DMLAB_ACTIONS = (
    {"MOVE_BACK_FORWARD": 1},  # forward
    {"MOVE_BACK_FORWARD": -1},  # backward
    {"STRAFE_LEFT_RIGHT": -1},  # strafe left
    {"STRAFE_LEFT_RIGHT": 1},  # strafe right
    {"LOOK_LEFT_RIGHT_PIXELS_PER_FRAME": -20},  # look left
    {"LOOK_LEFT_RIGHT_PIXELS_PER_FRAME": 20},  # look right
    {"LOOK_LEFT_RIGHT_PIXELS_PER_FRAME": -20, "MOVE_BACK_FORWARD": 1},  # look left + forward
    {"LOOK_LEFT_RIGHT_PIXELS_PER_FRAME": 20, "MOVE_BACK_FORWARD": 1},  # look right + forward
    {"FIRE": 1},  # fire
)
OBS_HEIGHT, OBS_WIDTH, ACTION_REPEAT = 72, 96, 4
# The stand-ins, made to look like DMLab: one RGB frame at 72x96 (ProcGen keeps its 64x64), action repeat 4
DMLAB_LIKE = dict(stack_num=1, img_height=OBS_HEIGHT, img_width=OBS_WIDTH, frame_skip=ACTION_REPEAT)
ENVPOOL_PIXEL_KWARGS = {
    "envpool.vizdoom": dict(DMLAB_LIKE, use_combined_action=True),
    "envpool.atari": dict(DMLAB_LIKE, gray_scale=False, episodic_life=False, reward_clip=False, repeat_action_probability=0.0),
    "envpool.procgen": dict(),
}
# EnvPool's ViZDoom reward counts only game-variable changes (its reward_config), not a scenario's own
# scripted reward. MyWayHome's is +1 for reaching the vest, the only way its episodes terminate.
VIZDOOM_GOAL_REWARD = {"MyWayHome-v1": 1.0}


def envpool_family(env_id):
    spec = envpool.registration.registry.specs.get(env_id)
    return spec[0] if spec is not None and spec[0] in ENVPOOL_PIXEL_KWARGS else None


def env_info(env_id):
    """(observation shape, number of actions), checking the backend is usable; a user error if not."""
    if env_id in DMLAB30:
        try:
            import deepmind_lab  # noqa: F401
        except ImportError:  # it cannot be pip-installed
            fail("no `deepmind_lab`: build it from https://github.com/google-deepmind/lab, or use --env-id MyWayHome-v1")
        return (3, OBS_HEIGHT, OBS_WIDTH), len(DMLAB_ACTIONS)
    family = envpool_family(env_id)
    if family is None:
        pixel_ids = sorted(k for k, v in envpool.registration.registry.specs.items() if v[0] in ENVPOOL_PIXEL_KWARGS)
        close = difflib.get_close_matches(env_id, list(DMLAB30) + pixel_ids, n=3, cutoff=0.5) or [
            "rooms_watermaze",
            "MyWayHome-v1",
        ]
        fail(
            f"unknown env id {env_id!r}, neither a DMLab-30 level nor an EnvPool pixel task; did you mean {', '.join(close)}?"
        )
    try:
        spec = envpool.make_spec(env_id, **ENVPOOL_PIXEL_KWARGS[family])
    except ImportError as e:  # e.g. ProcGen without the system Qt runtime
        fail(f"EnvPool cannot load {env_id}: {str(e).splitlines()[0]}")
    return spec.observation_space.shape, spec.action_space.n


class EnvPoolEnvs:
    """An EnvPool pixel task, with the agent's view of episode ends (as in rtrl_a2c_atari.py).

    EnvPool answers the step after an episode ends with the next episode's first observation and
    ignores that step's action. So the observation that follows a `terminated`/`truncated` is the
    terminal one: the step taking it has `terminal_obs` (its value bootstraps a truncation, it gets no loss),
    and the step after it is `first` (state and sensitivities reset).
    """

    def __init__(self, env_id, seeds):
        family = envpool_family(env_id)
        self.envs = envpool.make(
            env_id, env_type="gymnasium", num_envs=len(seeds), env_seed=[int(s) for s in seeds], **ENVPOOL_PIXEL_KWARGS[family]
        )
        self.goal_reward = VIZDOOM_GOAL_REWARD.get(env_id, 0.0)
        n = len(seeds)
        obs, _ = self.envs.reset()
        self.obs = torch.as_tensor(obs)
        self.last_reward = torch.zeros(n)
        self.first = torch.ones(n, dtype=torch.bool)
        self.terminal_obs = torch.zeros(n, dtype=torch.bool)
        self.episode_return = np.zeros(n)

    def step(self, action):
        """Returns (reward, terminated) of the step and the (env, return, length) of episodes that ended."""
        obs, reward, term, trunc, info = self.envs.step(action.numpy())
        reward = reward + self.goal_reward * term
        self.episode_return += reward
        episodes = []
        for i in np.flatnonzero(term | trunc):
            episodes.append((int(i), self.episode_return[i], int(info["elapsed_step"][i])))
            self.episode_return[i] = 0.0
        self.first = self.terminal_obs  # the step after a terminal observation returns a new episode's first one
        self.terminal_obs = torch.as_tensor(term | trunc)
        self.obs = torch.as_tensor(obs)
        self.last_reward = torch.as_tensor(reward, dtype=torch.float32)
        return self.last_reward, torch.as_tensor(term), episodes

    def close(self):
        self.envs.close()


class DmLabEnvs:
    """DeepMind Lab levels (Method §5): RGB_INTERLEAVED 72x96, IMPALA's 9 actions, action repeat 4 with rewards
    summed (Lab.step(action, num_steps) sums them), episode end from is_running().

    DMLab has no observation once an episode is over, so, as in IMPALA, the episode's last step is terminal
    (no bootstrap) and the next observation is the new episode's first: no step takes a terminal observation.
    """

    def __init__(self, level, seeds, dataset_path="", test=False):
        import deepmind_lab

        config = {"width": str(OBS_WIDTH), "height": str(OBS_HEIGHT), "logLevel": "WARN"}
        if dataset_path:
            config["datasetPath"] = dataset_path
        if test:
            level, config = DMLAB30_TEST_LEVELS.get(level, level), config | DMLAB_EVAL_CONFIG
        self.labs = [deepmind_lab.Lab(f"contributed/dmlab30/{level}", ["RGB_INTERLEAVED"], config=config) for _ in seeds]
        names = [spec["name"] for spec in self.labs[0].action_spec()]
        self.action_vectors = np.zeros((len(DMLAB_ACTIONS), len(names)), dtype=np.intc)
        for i, action in enumerate(DMLAB_ACTIONS):
            for name, value in action.items():
                self.action_vectors[i, names.index(name)] = value
        self.rngs = [np.random.default_rng(int(s)) for s in seeds]  # each env's episode seeds
        n = len(seeds)
        self.obs = torch.zeros((n, 3, OBS_HEIGHT, OBS_WIDTH), dtype=torch.uint8)
        for i in range(n):
            self._reset(i)
        self.last_reward = torch.zeros(n)
        self.first = torch.ones(n, dtype=torch.bool)
        self.terminal_obs = torch.zeros(n, dtype=torch.bool)
        self.episode_return, self.episode_length = np.zeros(n), np.zeros(n, dtype=int)

    def _reset(self, i):
        self.labs[i].reset(seed=int(self.rngs[i].integers(2**31 - 1)))
        self._observe(i)

    def _observe(self, i):
        self.obs[i] = torch.from_numpy(self.labs[i].observations()["RGB_INTERLEAVED"]).permute(2, 0, 1)

    def step(self, action):
        n = len(self.labs)
        self.obs = self.obs.clone()  # a new tensor per step, as EnvPool's: actors keep the old ones
        reward, term, episodes = np.zeros(n), np.zeros(n, dtype=bool), []
        for i, a in enumerate(action.tolist()):
            reward[i] = self.labs[i].step(self.action_vectors[a], num_steps=ACTION_REPEAT)  # sums the 4 frames' rewards
            self.episode_return[i] += reward[i]
            self.episode_length[i] += 1
            term[i] = not self.labs[i].is_running()
            if term[i]:
                episodes.append((i, self.episode_return[i], int(self.episode_length[i])))
                self.episode_return[i], self.episode_length[i] = 0.0, 0
                self._reset(i)
            else:
                self._observe(i)
        self.first = torch.as_tensor(term)
        self.last_reward = torch.as_tensor(reward, dtype=torch.float32)
        return self.last_reward, torch.as_tensor(term), episodes

    def close(self):
        for lab in self.labs:
            lab.close()


def make_envs(env_id, seeds, dataset_path="", test=False):
    """The training envs, or with `test` the evaluation ones (DMLab's held-out variants; EnvPool's are the same)."""
    return DmLabEnvs(env_id, seeds, dataset_path, test) if env_id in DMLAB30 else EnvPoolEnvs(env_id, seeds)


# ---------------------------------------------------------------------------------------------
# Actors: each a process with its own environments and a CPU copy of the latest weights
# ---------------------------------------------------------------------------------------------
STEP_KEYS = ("obs", "last_rewards", "firsts", "terminal_obs")  # what a step is taken from: T + 1 of each per unroll
UNROLL_KEYS = (*STEP_KEYS, "actions", "logits", "rewards", "terms")  # and what it did: T of each


def step_inputs(envs):
    """What the next step is taken from, in STEP_KEYS' order: the observation, the last reward, the episode flags."""
    return envs.obs, envs.last_reward, envs.first, envs.terminal_obs


def actor_seed(args, rank, actor_id, incarnation, start_step=0):
    """Distinct seeds derived from --seed for every learner, actor, restart and environment (Method §6). A run
    resumed at `start_step` folds it in: its actors do not replay the episodes of the run's start."""
    return np.random.default_rng([args.seed, rank, actor_id, incarnation, *([start_step] if start_step else [])])


def load_weights(agent, weights, version, my_version):
    """Copy the learner's latest weights if they are newer; returns their version (the updates they include).

    A seqlock, not a lock: an actor killed mid-copy can then never block the learner. The learner makes
    `version` odd while it writes; a copy is kept only if `version` was even and unchanged around it.
    """
    while True:
        v = version.value
        if v == 2 * my_version:
            return my_version
        if v % 2 == 0:
            agent.load_state_dict(weights)
            if version.value == v:
                return v // 2
        time.sleep(0.001)


def keep_pipes_from_env_processes():
    """Mark every open fd close-on-exec before the environments start their processes (ViZDoom's).

    The fds that spawn handed us (our pipe to the learner, the process sentinel) arrive inheritable. An env
    process holding our pipe's write end outlives us, so a message we die in the middle of would block the
    learner's read forever instead of ending it.
    """
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else range(3, 256)
    for fd in map(int, fds):
        with contextlib.suppress(OSError):
            if fd > 2:
                os.set_inheritable(fd, False)


def actor_loop(args, obs_shape, num_actions, rank, actor_id, incarnation, start_step, workdir, weights, version, sender):
    """Step the environments, carrying c and its sensitivities online; send unrolls of T + 1 steps. Every actor
    starts new episodes from zero (c, sens), after a resume too: a state belongs only to the episode that made it.

    An unroll's last step is the next unroll's first (IMPALA's overlap): the learner uses it only to bootstrap.
    With it go the (c, sens) before its first step, the weights' version for the policy lag, and when it was
    finished: time.monotonic() is one clock for all processes of a machine (CLOCK_MONOTONIC), so the learner
    can take the oldest first. Sending blocks while the learner holds an unread unroll of ours.
    """
    os.setpgrp()  # our env processes join our group: the learner can kill them even if we die (see ActorPool)
    keep_pipes_from_env_processes()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the learner decides when we stop
    torch.set_num_threads(1)
    os.chdir(workdir)  # ViZDoom instances sharing a directory race on creating ./_vizdoom
    rng = actor_seed(args, rank, actor_id, incarnation, start_step)
    torch.manual_seed(int(rng.integers(2**31 - 1)))
    seeds = rng.choice(2**31 - 1, size=args.envs_per_actor, replace=False)
    envs = make_envs(args.env_id, seeds, args.dmlab_dataset_path)
    agent = Agent(obs_shape, num_actions, args.hidden_size, args.core)
    c, sens = agent.initial_state(args.envs_per_actor)
    episodes, my_version = [], -1
    unroll = {k: [] for k in UNROLL_KEYS} | {k: [v] for k, v in zip(STEP_KEYS, step_inputs(envs))}  # starts at the reset
    try:
        while True:
            start, c0, sens0 = time.monotonic(), c, sens  # the (c, sens) before the unroll's first step
            my_version = load_weights(agent, weights, version, my_version)
            for _ in range(args.unroll_length):
                action, logits, c, sens = agent.act(envs.obs, envs.last_reward, c, envs.first, sens)
                reward, term, ended = envs.step(action)
                for k, v in zip(UNROLL_KEYS, (*step_inputs(envs), action, logits, reward, term)):
                    unroll[k].append(v)  # what the step did, and what the next step is taken from
                episodes += ended
            item = {k: torch.stack(v).numpy() for k, v in unroll.items()} | {"c0": c0.numpy(), "episodes": episodes}
            item |= {"sens0": {k: s.numpy() for k, s in sens0.items()}, "version": my_version, "actor": actor_id}
            sender.send(item | {"finished": time.monotonic(), "seconds": time.monotonic() - start})
            # its last step only bootstraps it: that step is the next unroll's first
            unroll, episodes = {k: v[-1:] if k in STEP_KEYS else [] for k, v in unroll.items()}, []
    except (BrokenPipeError, ConnectionResetError):
        pass  # the learner closed our pipe: it is stopping (or gone)
    finally:
        envs.close()


ACTOR_STARTUP_SECONDS = 600  # an actor's first unroll includes starting its envs: DMLab compiles its level's map


class ActorPool:
    """One learner's actors: start them, restart the dead and the hung ones, hand out the oldest unrolls,
    publish weights, stop them all.

    Each actor has its own pipe (a shared queue can be left locked or half-written by a killed actor), and
    leads its own process group, so killing the group also kills the environment processes it started
    (ViZDoom's ignore SIGTERM and outlive a crashed parent).
    """

    def __init__(self, args, obs_shape, num_actions, rank, agent, workdir, start_step=0, updates=0):
        """`start_step`, `updates`: where a resumed run's learner starts (its global step, the weights' version)."""
        self.ctx = mp.get_context("spawn")
        self.args, self.obs_shape, self.num_actions, self.rank, self.workdir = args, obs_shape, num_actions, rank, workdir
        self.start_step = start_step
        self.weights = {k: v.detach().cpu().clone().share_memory_() for k, v in agent.state_dict().items()}
        self.version = self.ctx.Value("q", 2 * updates, lock=False)  # 2 x the published updates; odd while writing
        n = args.num_actors
        self.procs, self.receivers, self.incarnations = [None] * n, [None] * n, [0] * n
        self.sent, self.early_deaths, self.restarts, self.hangs = [0] * n, [0] * n, 0, 0
        self.waiting = [None] * n  # the one unroll read from each actor and not yet in a batch
        self.waiting_since = [0.0] * n  # when we began to wait for actor i's next unroll
        self.unroll_seconds = collections.deque(maxlen=100)  # how long the latest unrolls took their actors
        for i in range(n):
            self._start(i)

    @property
    def updates(self):
        return self.version.value // 2

    def _start(self, i):
        workdir = os.path.join(self.workdir, f"actor{i}")
        os.makedirs(workdir, exist_ok=True)
        self.receivers[i], sender = self.ctx.Pipe(duplex=False)
        run, actor = (self.args, self.obs_shape, self.num_actions, self.rank), (i, self.incarnations[i], self.start_step)
        shared = (workdir, self.weights, self.version, sender)
        self.procs[i] = self.ctx.Process(target=actor_loop, args=(*run, *actor, *shared), daemon=True)
        self.procs[i].start()
        sender.close()  # the actor holds the only writing end: if it dies, our reads end instead of hanging
        self.sent[i], self.waiting_since[i] = 0, time.monotonic()

    def _kill_group(self, i):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.procs[i].pid, signal.SIGKILL)

    def _restart(self, i, what):
        """Replace actor i, which `what` (died, hung); a user error once it failed 3 times before its first unroll."""
        p = self.procs[i]
        self.early_deaths[i] = 0 if self.sent[i] else self.early_deaths[i] + 1
        if self.early_deaths[i] >= 3:
            self.stop()
            fail(
                f"actor {i} failed {self.early_deaths[i]} times before sending an unroll (last: {what}); see its output above"
            )
        print(f"actor {i} (pid {p.pid}) {what}; restarting it", flush=True)
        self._kill_group(i)  # a hung actor, or a dead one's orphaned environment processes
        p.join(timeout=10)
        self.receivers[i].close()
        self.incarnations[i] += 1
        self.restarts += 1
        self._start(i)

    def restart_dead(self):
        for i, p in enumerate(self.procs):
            if not p.is_alive():
                self._restart(i, f"died with exit code {p.exitcode}")

    def restart_hung(self):
        """An actor alive that sends nothing (a stuck environment) while we wait for it: 10x the median unroll
        time, at least --actor-timeout, or ACTOR_STARTUP_SECONDS for a first unroll. An actor whose unroll
        waits here is only blocked on sending the next one, and is not timed."""
        deadline = max(self.args.actor_timeout, 10 * float(np.median(self.unroll_seconds or [0.0])))
        for i in range(len(self.procs)):
            waited = time.monotonic() - self.waiting_since[i]
            limit = deadline if self.sent[i] else ACTOR_STARTUP_SECONDS
            if self.waiting[i] is None and waited > limit:
                self.hangs += 1
                self._restart(i, f"sent no unroll for {waited:.1f} s (deadline {limit:.1f} s): hung")

    def _read_ready(self, timeout):
        """Read the unrolls ready from actors with none waiting here, waiting up to `timeout` seconds for one."""
        waited_for = {r: i for i, r in enumerate(self.receivers) if self.waiting[i] is None and not r.closed}
        if not waited_for:
            return
        for receiver in multiprocessing.connection.wait(list(waited_for), timeout=timeout):
            i = waited_for[receiver]
            try:
                self.waiting[i] = receiver.recv()
            except (EOFError, OSError):  # its actor died, perhaps mid-message: restart_dead replaces it
                receiver.close()
                continue
            self.sent[i] += 1
            self.unroll_seconds.append(self.waiting[i]["seconds"])

    def get_batch(self, should_stop):
        """--batch-size unrolls, stacked along the batch, the oldest waiting first; None if asked to stop.

        FIFO, as IMPALA's and torchbeast's queues: taking ready pipes in actor order would let the low-index
        actors fill every batch whenever the learner is the slower side. Never waits on a dead or hung actor.
        """
        items = []
        while len(items) * self.args.envs_per_actor < self.args.batch_size:
            self.restart_dead()
            if should_stop():
                return None
            self._read_ready(timeout=0.0 if any(w is not None for w in self.waiting) else 0.2)
            self.restart_hung()
            ready = [i for i, w in enumerate(self.waiting) if w is not None]
            if ready:
                oldest = min(ready, key=lambda i: self.waiting[i]["finished"])
                items.append(self.waiting[oldest])
                self.waiting[oldest], self.waiting_since[oldest] = None, time.monotonic()
        batch = {k: torch.from_numpy(np.concatenate([it[k] for it in items], axis=1)) for k in UNROLL_KEYS}
        batch["c0"] = torch.from_numpy(np.concatenate([it["c0"] for it in items]))
        batch["sens0"] = {k: torch.from_numpy(np.concatenate([it["sens0"][k] for it in items])) for k in items[0]["sens0"]}
        batch["versions"] = [it["version"] for it in items]
        batch["actors"] = [it["actor"] for it in items]
        batch["episodes"] = [e for it in items for e in it["episodes"]]
        batch["unroll_age"] = time.monotonic() - min(it["finished"] for it in items)  # seconds, the oldest's
        return batch

    def publish(self, agent):
        self.version.value += 1  # odd: actors wait
        for k, v in agent.state_dict().items():
            self.weights[k].copy_(v)
        self.version.value += 1

    def stop(self):
        for receiver in self.receivers:
            receiver.close()  # an actor's next send fails and it exits, closing its environments
        deadline = time.time() + 10
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.time()))
        for i in range(len(self.procs)):
            self._kill_group(i)
            self.procs[i].join()


# ---------------------------------------------------------------------------------------------
# Greedy evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_episodes(agent, envs, num_episodes):
    """Greedy play until each of the n envs has ended its quota of episodes, num_episodes // n, plus one for
    the first num_episodes % n envs. The quotas are fixed before play, so short episodes do not crowd out
    long ones (keeping the first num_episodes to end would). Each kept episode's tuple without the env, env by env."""
    n, device = len(envs.first), agent.critic.weight.device
    quotas = [num_episodes // n + (i < num_episodes % n) for i in range(n)]
    c, _ = agent.cell.initial_state(n)
    finished = [[] for _ in range(n)]
    while any(len(episodes) < quota for episodes, quota in zip(finished, quotas)):
        obs, last_reward, first = envs.obs.to(device), envs.last_reward.to(device), envs.first.to(device)
        action, _, c, _ = agent.act(obs, last_reward, c, first, {}, greedy=True)  # {}: evaluation carries no sensitivities
        for i, *episode in envs.step(action.cpu())[2]:
            if len(finished[i]) < quotas[i]:
                finished[i].append(tuple(episode))
    return [episode for episodes in finished for episode in episodes]


def evaluate(agent, args, seeds, workdir):
    """Greedy returns of --eval-episodes episodes on len(seeds) fresh environments, each playing its quota:
    on DMLab the held-out variant of the level where DMLab-30 has one. Returns (returns, level played)."""
    with contextlib.chdir(workdir):
        envs = make_envs(args.env_id, seeds, args.dmlab_dataset_path, test=True)
    try:
        episodes = greedy_episodes(agent, envs, args.eval_episodes)
    finally:  # also on Ctrl-C, which stops an evaluation at once: no environment process outlives it
        envs.close()
    return [episode[0] for episode in episodes], DMLAB30_TEST_LEVELS.get(args.env_id, args.env_id)  # (return, length)


# ---------------------------------------------------------------------------------------------
# Infrastructure: argument checks, the device, a stem from a file, checkpoints, the progress line
# ---------------------------------------------------------------------------------------------
def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def one_line(e):
    """An exception's message in one line: its first two (load_state_dict's then name the first mismatch)."""
    return " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__


MAY_BE_ZERO = ("seed", "checkpoint_every", "eval_episodes", "learning_rate", "rms_eps", "gamma", "ent_coef", "vf_coef")


def check_args(args):
    """What would run silently wrong becomes a one-line error; returns the environment's (obs shape, actions)."""
    for name, value in vars(args).items():  # a negative count or coefficient would run, wrongly
        if type(value) in (int, float) and name != "num_updates" and (value < 0 or value == 0 and name not in MAY_BE_ZERO):
            fail(f"--{name.replace('_', '-')} must be {'at least 0' if name in MAY_BE_ZERO else 'positive'}, got {value}")
    if args.gamma > 1 or args.rms_alpha > 1:
        fail(f"--gamma and --rms-alpha must be at most 1, got {args.gamma}, {args.rms_alpha}")
    if args.batch_size % args.envs_per_actor:  # an actor sends its environments' unrolls together
        fail(f"--batch-size {args.batch_size} must be a multiple of --envs-per-actor {args.envs_per_actor}")
    if args.total_timesteps < args.batch_size * args.unroll_length * args.world_size:
        fail(f"--total-timesteps {args.total_timesteps} is less than one update (--batch-size x --unroll-length x learners)")
    if args.env_id in DMLAB_NEEDS_DATASET and not args.dmlab_dataset_path:
        fail(f"{args.env_id} needs the Brady, Konkle & Oliva (2008) images (see DMLab's data/): pass --dmlab-dataset-path")
    return env_info(args.env_id)


def pick_device(args, local_rank=0, local_world_size=1):
    """The device and the line that names it, printed and logged at start: a fallback to the CPU is never silent
    (a torch CUDA build that does not match the driver finds no device). --cuda: GPU `local_rank`, one per rank
    (NCCL refuses two ranks on one GPU)."""
    if args.cuda and torch.cuda.is_available():
        if local_world_size > torch.cuda.device_count():
            fail(
                f"--cuda: {local_world_size} ranks on this node but {torch.cuda.device_count()} GPU(s); start at most "
                f"{torch.cuda.device_count()} (torchrun --nproc_per_node), or add --no-cuda for gloo on the CPU"
            )
        device = torch.device("cuda", local_rank)
        return device, f"device: {device} ({torch.cuda.get_device_name(device)}, torch CUDA {torch.version.cuda})"
    return torch.device("cpu"), ("device: cpu (--cuda: no CUDA device found)" if args.cuda else "device: cpu")


def load_stem(agent, path):
    """--init-stem-from: copy every `stem.*` parameter from a model.pt or checkpoint.pt of this script (any core)."""
    if not os.path.isfile(path):
        fail(f"--init-stem-from {path}: " + ("a directory, not a file" if os.path.isdir(path) else "no such file"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model, writer = checkpoint["model"], checkpoint.get("script", os.path.basename(__file__))
    except Exception as e:  # not a torch file, truncated, or not a dict with a model
        fail(f"--init-stem-from {path}: not a checkpoint ({one_line(e)})")
    if writer != os.path.basename(__file__):
        fail(f"--init-stem-from {path}: written by {writer}; the stem must come from {os.path.basename(__file__)}")
    try:
        agent.stem.load_state_dict({k.removeprefix("stem."): v for k, v in model.items() if k.startswith("stem.")})
    except RuntimeError as e:  # another script's stem, or another observation shape
        fail(f"--init-stem-from {path}: its stem does not fit this agent's ({one_line(e)})")


def save_checkpoint(agent, args, path, **state):
    """Atomic (a crash mid-write leaves the previous file whole), of CPU copies of every tensor (a GPU run's loads on
    a CPU); with `state` (optimizer, run_name, iteration, global_step), one to --resume from."""
    cpu = lambda x: {k: cpu(v) for k, v in x.items()} if isinstance(x, dict) else x.cpu() if torch.is_tensor(x) else x
    checkpoint = {"script": os.path.basename(__file__), "model": agent.state_dict(), "args": vars(args), **state}
    torch.save(cpu(checkpoint), f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def parse_args(argv=None):
    """(args, checkpoint): with --resume, as nanoGPT, the checkpoint's args are the defaults and the flags given win."""
    args = tyro.cli(Args, args=argv)
    try:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
        if checkpoint is not None and "optimizer" not in checkpoint:
            raise ValueError("a model.pt holds the weights only: resume from a checkpoint.pt")
        return (tyro.cli(Args, args=argv, default=Args(**checkpoint["args"])) if checkpoint else args), checkpoint
    except Exception as e:  # no such file, not a checkpoint, another script's
        fail(f"--resume {args.resume}: {one_line(e)}")


def resume(checkpoint, agent, optimizer, args):
    """The model and the optimizer from the checkpoint (flags given win), RNGs reseeded from (seed, step), as the
    actors' are; returns (run name, iteration, global step). Not the actors: an environment cannot be snapshotted."""
    try:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except Exception as e:  # another agent's shapes (--hidden-size, --core), --freeze-stem on or off
        fail(f"--resume {args.resume}: the checkpoint does not fit: {one_line(e)}")
    if checkpoint["args"]["world_size"] != args.world_size:  # an update's batch, so its steps and LR schedule, would change
        fail(f"--resume {args.resume}: its run had {checkpoint['args']['world_size']} learners, this one {args.world_size}")
    optimizer.param_groups[0].update(lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)  # flags win
    seed = int(np.random.SeedSequence([args.seed, checkpoint["global_step"]]).generate_state(1)[0])
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return checkpoint["run_name"], checkpoint["iteration"], checkpoint["global_step"]


def progress(elapsed, steps_done, steps_left):
    """elapsed=4m09s eta=10h31m: the elapsed time, and an ETA at this process's steps/s so far."""
    hms = lambda s: f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"elapsed={hms(round(elapsed))} eta={hms(round(elapsed * steps_left / steps_done))}"


def weights_digest(agent):
    h = hashlib.sha256()
    for v in agent.state_dict().values():
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    args, checkpoint = parse_args()
    distributed = "RANK" in os.environ  # under torchrun: one learner per rank, each with its own actors
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    local_world_size, args.world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ.get("WORLD_SIZE", 1))
    obs_shape, num_actions = check_args(args)
    per_update = args.batch_size * args.unroll_length * args.world_size
    args.num_updates = args.total_timesteps // per_update
    device, device_line = pick_device(args, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and every bare .cuda() use this rank's GPU, not GPU 0
    # the float32 agreement of RTRL and BPTT (README) needs full-precision GEMMs: TF32 keeps 10 mantissa bits and
    # the cell's reductions over T*B lose about three digits. Only matmuls: cuDNN's convolutions (stem) may use TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    if distributed:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )

    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if device.type == "cpu":  # actors take a core each; an oversubscribed OpenMP pool runs many times slower than one
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size - args.num_actors))

    agent = Agent(obs_shape, num_actions, args.hidden_size, args.core, args.freeze_stem).to(device)
    if args.init_stem_from and not args.resume:  # before anything is written or any actor starts
        load_stem(agent, args.init_stem_from)
    if distributed:  # identical initial weights on every rank
        for p in agent.parameters():
            dist.broadcast(p.data, src=0)
    trained = [p for p in agent.parameters() if p.requires_grad]  # a frozen stem's get no gradient, no optimizer state
    optimizer = torch.optim.RMSprop(trained, lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)
    # the core and unroll are in the name: a sweep's runs started in the same second never share a directory
    run_name = f"{args.env_id}__{args.exp_name}__{args.core}__T{args.unroll_length}__{args.seed}__{int(time.time())}"
    iteration, global_step = 0, 0  # updates made (the published weights' version), agent steps learned from
    if checkpoint:  # still before anything is written: a checkpoint that does not fit leaves the run untouched
        run_name, iteration, global_step = resume(checkpoint, agent, optimizer, args)
    elif rank == 0 and os.path.exists(f"runs/{run_name}"):
        fail(f"runs/{run_name} exists; a run directory is never shared by two runs")
    checkpoint_path, next_checkpoint = f"runs/{run_name}/checkpoint.pt", global_step + args.checkpoint_every

    def save():  # rank 0 writes; the ranks hold the same
        state = dict(optimizer=optimizer.state_dict(), run_name=run_name, iteration=iteration, global_step=global_step)
        save_checkpoint(agent, args, checkpoint_path, **state)

    writer = None
    if rank == 0:  # resumed: TensorBoard drops what the run logged after its checkpoint, and its event files go on
        writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1 if args.resume else None)
        print(device_line, flush=True)
        writer.add_text("device", device_line)
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
        )
        if args.resume:
            print(f"resumed runs/{run_name} at global_step={global_step}: actors start new episodes from zero state")

    stop = []  # Ctrl-C / SIGTERM: finish the update, stop every process, checkpoint, exit 128 + the signal's number
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stop.append(signum))
    workdir = tempfile.mkdtemp(prefix=f"rtrl_impala_rank{rank}_")
    actors = None  # resumed: new seeds (not a replay of the run's start); none if no update is left to make
    if iteration < args.num_updates:
        actors = ActorPool(args, obs_shape, num_actions, rank, agent, workdir, global_step, iteration)
    start_step, start_time, last_line, recent_returns, interrupted = global_step, time.time(), 0.0, [], False

    try:
        for update in range(iteration + 1, args.num_updates + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / args.num_updates) * args.learning_rate
            batch = actors.get_batch(lambda: bool(stop))
            optimizer.zero_grad()
            if batch is not None:
                stats = compute_gradients(agent, to_device(batch, device), args)
            else:  # stopping: take part in this round's all-reduce with no gradient
                for p in trained:
                    p.grad = torch.zeros_like(p)
            interrupted = all_reduce_gradients(trained, batch is None) if distributed else batch is None
            if interrupted:
                break
            grad_norm = nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
            optimizer.step()
            policy_lag = np.mean([actors.updates - v for v in batch["versions"]])  # updates behind the learner
            actors.publish(agent)
            iteration, global_step = update, global_step + per_update

            if rank == 0:
                for _, episode_return, episode_length in batch["episodes"]:
                    writer.add_scalar("charts/episodic_return", episode_return, global_step)
                    writer.add_scalar("charts/episodic_length", episode_length, global_step)
                    recent_returns = (recent_returns + [episode_return])[-20:]
                steps_per_second = (global_step - start_step) / (time.time() - start_time)  # this process's steps only
                scalars = {f"losses/{key}": value for key, value in stats.items()} | {"losses/grad_norm": grad_norm.item()}
                scalars |= {"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/policy_lag": policy_lag}
                scalars |= {"charts/unroll_age": batch["unroll_age"], "charts/actor_restarts": actors.restarts}
                scalars |= {"charts/actor_hangs": actors.hangs, "charts/SPS": int(steps_per_second)}
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, global_step)
                if time.time() - last_line > 10 or update == args.num_updates:  # the first update's, every 10 s, the last
                    last_line, steps_left = time.time(), args.num_updates * per_update - global_step
                    mean_return = f"{np.mean(recent_returns):.2f}" if recent_returns else "n/a"
                    print(
                        f"global_step={global_step} SPS={int(steps_per_second)} "
                        f"{progress(last_line - start_time, global_step - start_step, steps_left)} "
                        f"return(last {len(recent_returns)} episodes)={mean_return} "
                        f"policy_lag={policy_lag:.2f} unroll_age={batch['unroll_age']:.2f}s "
                        f"entropy={stats['entropy'] / (args.unroll_length * args.batch_size):.3f}",
                        flush=True,
                    )
                if args.checkpoint_every and global_step >= next_checkpoint:
                    save()
                    next_checkpoint = global_step + args.checkpoint_every
    finally:
        if actors is not None:
            actors.stop()  # also on an error: no actor or environment process outlives the learner

    if distributed:  # ranks hold identical weights: each prints its digest, for anyone to compare
        print(f"rank {rank}/{args.world_size}: weights sha256 {weights_digest(agent)}", flush=True)
    if rank == 0 and (interrupted or args.checkpoint_every):  # a stop, or the end of training
        save()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C during the evaluation below stops it at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if rank == 0 and interrupted:  # every rank stops (the all-reduce carried the request)
            by = signal.Signals(stop[0]).name if stop else "another rank's signal"
            print(f"stopped by {by} at global_step={global_step}; continue with --resume {checkpoint_path}", flush=True)
        elif rank == 0:
            if args.save_model:
                save_checkpoint(agent, args, f"runs/{run_name}/model.pt")
                print(f"model saved to runs/{run_name}/model.pt", flush=True)
            if args.eval_episodes > 0:
                rng = actor_seed(args, rank, args.num_actors, 0)  # an actor id no actor has: unseen seeds
                eval_seeds = rng.choice(2**31 - 1, size=min(args.eval_episodes, 8), replace=False)
                eval_returns, eval_level = evaluate(agent, args, eval_seeds, workdir)
                for i, eval_return in enumerate(eval_returns):
                    writer.add_scalar("eval/episodic_return", eval_return, i)
                print(f"greedy evaluation over {len(eval_returns)} episodes of {eval_level}: mean {np.mean(eval_returns):.2f}")
        if rank == 0:
            writer.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if distributed:
        dist.destroy_process_group()
    if interrupted:  # only a signalled rank has a number
        sys.exit(128 + stop[0] if stop else 0)
