"""A2C with an element-wise LSTM trained by exact real-time recurrent learning (RTRL) on ProcGen.

Irie, Gopalakrishnan, Schmidhuber, "Exploring the Promise and Limits of Real-Time Recurrent
Learning", ICLR 2024 (arXiv 2305.19044). The eLSTM's recurrence is diagonal, so its RTRL
sensitivities cost O(B N D) per step, like its input projection: the recurrent parameters
get untruncated gradients from carried sensitivities, with no stored history. Trained on a
fixed set of levels, evaluated greedily on those and on held-out levels.

    python rtrl_a2c_procgen.py --env-id ChaserHard-v0        # --core tbptt | lstm | ff for baselines

The default game is the paper's main ProcGen experiment, Chaser in hard mode on 500 training levels (it
compares unrolls 5 and 50: --num-steps). The paper's two-stage recipe (its DMLab runs): pretrain the stem
with TBPTT, then train the recurrent part by RTRL alone on that stem, frozen, so nothing backpropagates
through time:

    python rtrl_a2c_procgen.py --core tbptt --save-model
    python rtrl_a2c_procgen.py --core rtrl --init-stem-from runs/<that run>/model.pt --freeze-stem

Long runs: --checkpoint-every N writes runs/<run>/checkpoint.pt every N steps (and on Ctrl-C / SIGTERM); the same
command with --resume runs/<run>/checkpoint.pt goes on from it, with every environment on a new episode.
"""

import ctypes
import difflib
import importlib
import importlib.util
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


def load_qt_runtime():
    """EnvPool's ProcGen links libQt5Core/libQt5Gui and loads them when envpool is imported. The
    PyQt5-Qt5 wheel (requirements.txt) ships both: load them globally first, so no system Qt5 is needed."""
    spec = importlib.util.find_spec("PyQt5")
    if spec is None or not sys.platform.startswith("linux"):
        return  # a system Qt5 may still serve; check_args says what to install if not
    lib_dir = os.path.join(list(spec.submodule_search_locations)[0], "Qt5", "lib")
    for name in ("libQt5Core.so.5", "libQt5Gui.so.5"):
        if os.path.exists(os.path.join(lib_dir, name)):
            ctypes.CDLL(os.path.join(lib_dir, name), mode=ctypes.RTLD_GLOBAL)
    if "envpool.procgen" in sys.modules:  # envpool was imported before us, maybe without Qt: load ProcGen again
        importlib.reload(sys.modules["envpool.procgen"])


load_qt_runtime()
import envpool  # noqa: E402  (after the Qt runtime is loaded)


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
    """agent steps between checkpoints, written atomically to `runs/{run_name}/checkpoint.pt` (0 = none); one is
    also written at the end when this is set, and always on Ctrl-C / SIGTERM"""
    resume: str = ""
    """a checkpoint.pt to continue: model, optimizer, LR position, step and RNG states are restored and the run
    directory's logs go on; every environment starts a new episode with zero recurrent state and sensitivities"""

    # Algorithm specific arguments
    env_id: str = "ChaserHard-v0"
    """the id of the EnvPool ProcGen environment (<Game><Easy|Hard|Extreme|Memory|Exploration>-v0)"""
    total_timesteps: int = 25_000_000
    """total agent steps over all environments"""
    num_envs: int = 16
    """the number of parallel game environments"""
    num_steps: int = 50
    """the rollout (= unroll) length; 1 updates after every environment step, fully online"""
    num_levels: int = 500
    """the number of training levels (0: unbounded, every level)"""
    start_level: int = 0
    """the first training level: training uses levels [start_level, start_level + num_levels)"""
    test_level_starts: tuple[int, ...] = (1000, 1200, 1400)
    """first level of each held-out test set"""
    test_num_levels: int = 200
    """levels per held-out test set"""
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
    """rtrl: eLSTM with exact untruncated RTRL gradients; tbptt: the same eLSTM with BPTT cut at each
    rollout's start; lstm: a standard LSTM (nn.LSTMCell) with BPTT cut the same way; ff: no memory (the
    eLSTM with its state zeroed at every step)"""
    stem_in_update: Literal["auto", "on", "off"] = "auto"
    """on: the rollout runs the stem without autograd and the update runs it again, one batched forward over
    T x B; off: the rollout keeps each step's small autograd graph of the stem and the update backprops through
    them (no second forward). auto: on for cuda (T graphs mean many tiny kernels), off for the CPU. Same gradients"""
    rtrl_impl: Literal["chunked", "step"] = "chunked"
    """exact RTRL in one GEMM-shaped pass per rollout (chunked) or by the per-step recursion (step): same numbers"""
    eval_episodes: int = 20
    """greedy evaluation episodes per level set (training levels, each test set), on min(this, num_envs) fresh
    envs that each play a quota fixed before play (this // envs, one more for the first this % envs); 0 skips it"""
    eval_every: int = 1_000_000
    """evaluate every this many agent steps, and at the end"""
    init_stem_from: str = ""
    """a model.pt of this script (any core): start from its stem, every `stem.*` parameter (the IMPALA ResNet's
    convolutions and the Linear layer after them); the cell and heads start fresh"""
    freeze_stem: bool = False
    """the stem gets no gradient and no update, so rtrl backpropagates through no time step at all; without
    --init-stem-from the stem stays at its random initialization (a random-features baseline)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def require_file(flag, path):
    """A file the run reads: a missing one is a one-line error before anything is written or any env starts."""
    if not os.path.isfile(path):
        fail(f"{flag} {path}: " + ("a directory, not a file" if os.path.isdir(path) else "no such file"))


def check_args(args):
    for name in ("total_timesteps", "num_envs", "num_steps", "hidden_size", "test_num_levels", "eval_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_episodes", "num_levels", "start_level"):
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
    if args.checkpoint_every < 0:
        fail(f"--checkpoint-every must be at least 0, got {args.checkpoint_every}")
    if args.init_stem_from and not args.resume:  # resumed, the stem is the checkpoint's: the file is not read
        require_file("--init-stem-from", args.init_stem_from)
    train_end = args.start_level + args.num_levels if args.num_levels > 0 else math.inf  # 0 means every level
    if train_end != math.inf and train_end > 2**31 - 1:
        fail(f"training levels [{args.start_level}, {train_end}) are outside ProcGen's [0, 2^31 - 1)")
    for start in args.test_level_starts:
        if start < 0 or start + args.test_num_levels > 2**31 - 1:
            fail(f"test levels [{start}, {start + args.test_num_levels}) are outside ProcGen's [0, 2^31 - 1)")
        if start < train_end and args.start_level < start + args.test_num_levels:
            fail(
                f"test levels [{start}, {start + args.test_num_levels}) overlap the training levels "
                f"[{args.start_level}, {train_end}): held-out levels must be unseen"
            )
    procgen_ids = sorted(k for k, v in envpool.registration.registry.specs.items() if v[0] == "envpool.procgen")
    if args.env_id not in procgen_ids:
        close = difflib.get_close_matches(args.env_id, procgen_ids, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        fail(f"unknown ProcGen env id {args.env_id!r}; {hint}valid ids: {', '.join(procgen_ids)}")
    try:
        envpool.make_spec(args.env_id)
    except ImportError:  # EnvPool's ProcGen found no libQt5Core/libQt5Gui
        fail(
            "EnvPool ProcGen needs the Qt5 runtime: `pip install PyQt5-Qt5` (in requirements.txt) "
            "or a system Qt5 (`apt install libqt5gui5`)"
        )


class ProcgenEnvs:
    """EnvPool ProcGen on a range of levels (64x64 RGB, 15 actions, Method §5) and the agent's view of episode ends.

    EnvPool answers the step after an episode ends with the next episode's first observation and
    ignores that step's action. So the observation that follows a `terminated`/`truncated` is the
    terminal one: the step taking it is `dead` (its value bootstraps a truncation, it gets no loss),
    and the step after it is `first` (state and sensitivities reset). Levels are drawn from
    [start_level, start_level + num_levels) by each env's own seed.
    """

    def __init__(self, env_id, seeds, start_level, num_levels, device):
        self.envs = envpool.make(
            env_id,
            env_type="gymnasium",
            num_envs=len(seeds),
            env_seed=[int(s) for s in seeds],
            start_level=start_level,
            num_levels=num_levels,
        )
        self.num_actions = self.envs.action_space.n
        self.device = device
        n = len(seeds)
        obs, _ = self.envs.reset()
        self.obs = torch.as_tensor(obs, device=device)
        self.last_reward = torch.zeros(n, device=device)
        self.first = torch.ones(n, dtype=torch.bool, device=device)
        self.dead = torch.zeros(n, dtype=torch.bool, device=device)
        self.episode_return = np.zeros(n)

    def step(self, action):
        """Returns (reward, terminated) of the step and (env, return, length, level seed) of episodes that ended."""
        obs, reward, term, trunc, info = self.envs.step(action.cpu().numpy())
        self.episode_return += reward
        episodes = []
        for i in np.flatnonzero(term | trunc):
            episodes.append((i, self.episode_return[i], int(info["elapsed_step"][i]), int(info["level_seed"][i])))
            self.episode_return[i] = 0.0
        self.first = self.dead  # the step after a dead one returns a new episode's first observation
        self.dead = torch.as_tensor(term | trunc, device=self.device)
        self.obs = torch.as_tensor(obs, device=self.device)
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
# The agent (Method §5): IMPALA ResNet stem -> [features ; clipped last reward] -> eLSTM (or LSTM) -> heads
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
        # the stem: everything before the cell that has parameters (--init-stem-from, --freeze-stem)
        self.stem = nn.Sequential(convs, nn.ReLU(), nn.Flatten(), nn.Linear(flat, 256), nn.ReLU())
        self.stem.to(memory_format=torch.channels_last)  # NHWC: CPU (oneDNN) convolutions run ~1.6x faster
        self.stem.requires_grad_(not freeze_stem)  # frozen: its output has no graph, so nothing flows back into it
        self.cell = LSTM(256 + 1, hidden_size) if core == "lstm" else ELSTM(256 + 1, hidden_size)
        # the eLSTM's output gate (Method §1); the LSTM has its own
        self.gate = None if core == "lstm" else nn.Linear(256 + 1 + hidden_size, hidden_size)
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

    obs: torch.Tensor  # T x B x 3 x 64 x 64, uint8
    last_rewards: torch.Tensor  # T x B, the reward input of each step
    firsts: torch.Tensor  # T x B, reset state and sensitivities before the step
    deads: torch.Tensor  # T x B, the observation is terminal: no loss, its value bootstraps
    actions: torch.Tensor  # T x B
    rewards: torch.Tensor  # T x B
    terms: torch.Tensor  # T x B, the step ended its episode (no bootstrap)
    values: torch.Tensor  # T x B
    features: torch.Tensor | None = None  # T x B x D, the stem's outputs with their graph; None: recompute


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

    A frozen stem (its features have no graph) gets nothing: no stem backward, and for rtrl the only
    backward pass is the heads' (per step, from leaves x_t and c_t); rtrl_scan's dL/dx goes unused.
    """
    resets = agent.resets(rollout.firsts)
    x = agent.features(rollout.obs, rollout.last_rewards) if rollout.features is None else rollout.features
    train_stem = x.requires_grad  # False with --freeze-stem
    x_leaf = x.detach().requires_grad_(train_stem)
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
        if train_stem:
            x.backward(x_leaf.grad + dl_dx)
    else:
        loss, stats = rollout_loss(agent, rollout, returns, x_leaf, agent.cell(x_leaf, c0, resets), args)
        loss.backward()
        if train_stem:
            x.backward(x_leaf.grad)
    return stats, sens_T, rtrl_time


def rollout_features(agent, obs, last_reward, stem_in_update):
    """One step's features for the policy. Without stem_in_update they keep the stem's autograd graph, and the
    update backprops through the T kept graphs (no second forward); with it, the update recomputes them."""
    if stem_in_update:
        with torch.no_grad():
            return agent.features(obs, last_reward)
    return agent.features(obs, last_reward)


def pick_device(args):
    """The device and the line that names it, printed and logged at start: a fallback to the CPU is never silent
    (a torch CUDA build that does not match the driver finds no device)."""
    if args.cuda and torch.cuda.is_available():
        device = torch.device("cuda:0")
        return device, f"device: cuda:0 ({torch.cuda.get_device_name(device)}, torch CUDA {torch.version.cuda})"
    return torch.device("cpu"), ("device: cpu (--cuda: no CUDA device found)" if args.cuda else "device: cpu")


def env_seeds(seed, n):
    """Distinct per-env seeds derived from --seed (Method §6)."""
    return np.random.default_rng(seed).choice(2**31 - 1, size=n, replace=False)


@torch.no_grad()
def greedy_episodes(agent, envs, num_episodes):
    """Greedy play until each of the n envs has ended its quota of episodes, num_episodes // n, plus one for
    the first num_episodes % n envs. The quotas are fixed before play, so short episodes do not crowd out
    long ones (keeping the first num_episodes to end would). Each kept episode's tuple without the env, env by env."""
    n = len(envs.first)
    quotas = [num_episodes // n + (i < num_episodes % n) for i in range(n)]
    c, _ = agent.cell.initial_state(n)
    finished = [[] for _ in range(n)]
    while any(len(episodes) < quota for episodes, quota in zip(finished, quotas)):
        action, _, c = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first, greedy=True)
        for i, *episode in envs.step(action)[2]:
            if len(finished[i]) < quotas[i]:
                finished[i].append(tuple(episode))
    return [episode for episodes in finished for episode in episodes]


def evaluate(agent, env_id, seeds, start_level, num_levels, num_episodes, device):
    """Greedy (return, level seed) of `num_episodes` episodes on levels [start_level, start_level + num_levels),
    on len(seeds) fresh environments, each playing its quota."""
    envs = ProcgenEnvs(env_id, seeds, start_level, num_levels, device)
    episodes = greedy_episodes(agent, envs, num_episodes)
    envs.close()
    return [(episode_return, level_seed) for episode_return, _, level_seed in episodes]


def level_sets(args):
    """name -> (start_level, num_levels): the training levels and each held-out test set."""
    sets = {"train": (args.start_level, args.num_levels)}
    return sets | {f"test {start}": (start, args.test_num_levels) for start in args.test_level_starts}


def evaluate_level_sets(agent, args, seeds, device, writer, global_step):
    """Greedy returns on every level set; logs eval/train_levels_return and eval/test_levels_return."""
    results = {
        name: evaluate(agent, args.env_id, seeds, start, num, args.eval_episodes, device)
        for name, (start, num) in level_sets(args).items()
    }
    test_returns = [r for name, episodes in results.items() if name != "train" for r, _ in episodes]
    writer.add_scalar("eval/train_levels_return", np.mean([r for r, _ in results["train"]]), global_step)
    if test_returns:
        writer.add_scalar("eval/test_levels_return", np.mean(test_returns), global_step)
    return results


def save_checkpoint(agent, args, path, **extra):
    """Atomic: a crash mid-write never leaves a truncated file behind, and the previous one stays until the new
    one is complete. `extra` makes it a checkpoint to resume from (see training_state)."""
    tmp = f"{path}.tmp"
    checkpoint = {"script": os.path.basename(__file__), "model": agent.state_dict(), "args": vars(args), **extra}
    torch.save(to_cpu(checkpoint), tmp)
    os.replace(tmp, path)


def to_cpu(obj):
    """Every tensor of a checkpoint (model, optimizer state) on the CPU: one saved on a GPU loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
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
    "stem_in_update",
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
        rng = checkpoint["rng"]
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        fail(f"--resume: the checkpoint does not fit this agent ({first_line})")
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


def load_stem(agent, path):
    """--init-stem-from: copy every `stem.*` parameter from a model.pt of this script (any core). A file that is
    not one, or whose stem does not fit (another script's, another observation shape), is a one-line error."""
    require_file("--init-stem-from", path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects other than tensors
        fail(f"--init-stem-from {path}: not a checkpoint ({(str(e).strip().splitlines() or [type(e).__name__])[0]})")
    model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict):
        fail(f"--init-stem-from {path}: not a checkpoint (no model state dict)")
    writer = checkpoint.get("script", os.path.basename(__file__))  # older checkpoints: their stem's shapes decide
    if writer != os.path.basename(__file__):
        fail(f"--init-stem-from {path}: written by {writer}; the stem must come from {os.path.basename(__file__)}")
    stem = {k.removeprefix("stem."): v for k, v in model.items() if isinstance(k, str) and k.startswith("stem.")}
    own = agent.stem.state_dict()
    shape = lambda t: "x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else "missing"
    for name in sorted(set(own) | set(stem)):
        if shape(stem.get(name)) != shape(own.get(name)):
            fail(
                f"--init-stem-from {path}: its stem does not fit this agent's (stem.{name} is {shape(stem.get(name))} "
                f"there, {shape(own.get(name))} here): another script's checkpoint, or another observation shape"
            )
    agent.stem.load_state_dict(stem)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    resumed = load_resume(args)  # before anything is made or written: a wrong file costs nothing
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    if resumed:  # the logs go on in the checkpoint's run directory
        run_name = resumed["run_name"]
    else:
        # the core and unroll are in the name: runs of a sweep started in the same second never share a directory
        run_name = f"{args.env_id}__{args.exp_name}__{args.core}__T{args.num_steps}__{args.seed}__{int(time.time())}"
        if os.path.exists(f"runs/{run_name}"):
            fail(f"runs/{run_name} exists; a run directory is never shared by two runs")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # full float32 matmuls: with TF32 (a common global setting) the cell's sums over T x B lose three digits and
    # the float32 RTRL/BPTT agreement (README) is gone; cuDNN convolutions (the stem) may keep TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    device, device_line = pick_device(args)
    print(device_line, flush=True)
    # on the CPU the T kept graphs were faster than a second forward (README); on a GPU they are many tiny kernels
    stem_in_update = args.stem_in_update == "on" or (args.stem_in_update == "auto" and device.type == "cuda")

    spec = envpool.make_spec(args.env_id)
    obs_shape = tuple(spec.observation_space.shape)
    agent = Agent(obs_shape, spec.action_space.n, args.hidden_size, args.core, args.freeze_stem).to(device)
    if args.init_stem_from and not resumed:  # before anything is written or any env starts: a wrong file costs nothing
        load_stem(agent, args.init_stem_from)
    elif args.freeze_stem and not resumed:
        print("--freeze-stem without --init-stem-from: the stem stays at its random initialization")
    # a frozen stem's parameters get no gradient, and no optimizer state either
    optimizer = torch.optim.RMSprop(
        [p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps
    )
    # still before anything is written: a checkpoint that does not fit is refused with the run directory untouched
    start_iteration, global_step = restore(resumed, agent, optimizer) if resumed else (0, 0)

    # resumed: TensorBoard drops what an interrupted run logged after its checkpoint, and the event files go on
    writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1 if resumed else None)
    writer.add_text("device", device_line)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    num_eval_envs = max(1, min(args.eval_episodes, args.num_envs))
    seeds = env_seeds(args.seed, args.num_envs + num_eval_envs)
    if resumed:
        print(
            f"resumed runs/{run_name} at global_step={global_step}: every environment starts a new episode, "
            "recurrent state and sensitivities zero"
        )
    # resumed: new episodes from new seeds, not a replay of the run's start (evaluation keeps the run's own)
    train_seeds = env_seeds([args.seed, global_step], args.num_envs) if resumed else seeds[: args.num_envs]
    eval_seeds = seeds[args.num_envs :]
    envs = ProcgenEnvs(args.env_id, train_seeds, args.start_level, args.num_levels, device)

    T, B = args.num_steps, args.num_envs
    rollout = Rollout(
        obs=torch.zeros((T, B, *obs_shape), dtype=torch.uint8, device=device),
        last_rewards=torch.zeros((T, B), device=device),
        firsts=torch.zeros((T, B), dtype=torch.bool, device=device),
        deads=torch.zeros((T, B), dtype=torch.bool, device=device),
        actions=torch.zeros((T, B), dtype=torch.long, device=device),
        rewards=torch.zeros((T, B), device=device),
        terms=torch.zeros((T, B), dtype=torch.bool, device=device),
        values=torch.zeros((T, B), device=device),
    )
    # a resumed run's episodes are new ones: they start from zero state and sensitivities, as every episode does
    c, sens = agent.cell.initial_state(B)
    start_step, start_time, recent_returns = global_step, time.time(), []
    progress = Progress(global_step, args.num_iterations * B * T)
    eval_time, next_eval, results = 0.0, global_step + args.eval_every, {}
    checkpoint_path, next_checkpoint = f"runs/{run_name}/checkpoint.pt", global_step + args.checkpoint_every
    stop = StopSignals()

    for iteration in range(start_iteration + 1, args.num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

        c0, features = c, []
        for step in range(T):
            global_step += B
            rollout.obs[step], rollout.last_rewards[step] = envs.obs, envs.last_reward
            rollout.firsts[step], rollout.deads[step] = envs.first, envs.dead
            features.append(rollout_features(agent, envs.obs, envs.last_reward, stem_in_update))
            action, rollout.values[step], c = agent.act(features[-1], c, envs.first)
            rollout.actions[step] = action
            rollout.rewards[step], rollout.terms[step], episodes = envs.step(action)
            for _, episode_return, episode_length, _ in episodes:
                writer.add_scalar("charts/episodic_return", episode_return, global_step)
                writer.add_scalar("charts/episodic_length", episode_length, global_step)
                recent_returns = (recent_returns + [episode_return])[-20:]

        update_start = timer(device)
        with torch.no_grad():  # c itself moves on in the next rollout
            next_value = agent.act(agent.features(envs.obs, envs.last_reward), c, envs.first)[1]
        rollout.features = None if stem_in_update else torch.stack(features)  # None: compute_gradients recomputes
        returns = n_step_returns(rollout, next_value, args.gamma)
        optimizer.zero_grad()
        stats, sens, rtrl_time = compute_gradients(agent, rollout, returns, c0, sens, args)
        grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        optimizer.step()
        update_time = timer(device) - update_start

        sps = int((global_step - start_step) / (time.time() - start_time - eval_time))  # this process's steps only
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for key, value in stats.items():
            writer.add_scalar(f"losses/{key}", value, global_step)
        writer.add_scalar("losses/grad_norm", grad_norm.item(), global_step)
        writer.add_scalar("charts/rtrl_share_of_update", rtrl_time / update_time, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if progress.due() or iteration == args.num_iterations:
            mean_return = f"{np.mean(recent_returns):.2f}" if recent_returns else "n/a"
            print(
                f"global_step={global_step} SPS={sps} {progress(global_step)} "
                f"return(last {len(recent_returns)} episodes)={mean_return} "
                f"entropy={stats['entropy'] / (T * B):.3f} rtrl_share={rtrl_time / update_time:.3f}",
                flush=True,
            )

        # stopping (Ctrl-C / SIGTERM): no evaluation is started, the checkpoint comes first
        due = global_step >= next_eval or iteration == args.num_iterations
        if args.eval_episodes > 0 and due and not stop.signum:
            eval_start, next_eval = time.time(), global_step + args.eval_every
            results = evaluate_level_sets(agent, args, eval_seeds, device, writer, global_step)
            eval_time += time.time() - eval_start
            print(
                f"global_step={global_step} greedy eval: "
                + ", ".join(f"{name} {np.mean([r for r, _ in episodes]):.2f}" for name, episodes in results.items()),
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
    stop.restore()  # from here on Ctrl-C stops at once
    if args.checkpoint_every:  # the end of training (a resumed run with no step left to train: as it was loaded)
        final = max(start_iteration, args.num_iterations)
        save_checkpoint(agent, args, checkpoint_path, **training_state(optimizer, run_name, final, global_step))

    if args.save_model:
        model_path = f"runs/{run_name}/model.pt"
        save_checkpoint(agent, args, model_path)
        print(f"model saved to {model_path}")
    if results:
        print(f"\ngreedy evaluation at step {global_step}, {args.eval_episodes} episodes per level set:")
        print(f"{'level set':<12}{'levels':<22}{'mean return':>12}{'std':>8}")
        for name, (start, num) in level_sets(args).items():
            levels = f"[{start}, {start + num})" if num > 0 else f"[{start}, inf)"
            episode_returns = [r for r, _ in results[name]]
            print(f"{name:<12}{levels:<22}{np.mean(episode_returns):>12.2f}{np.std(episode_returns):>8.2f}")
        test_returns = [r for name, episodes in results.items() if name != "train" for r, _ in episodes]
        if test_returns:
            print(f"{'test (all)':<34}{np.mean(test_returns):>12.2f}{np.std(test_returns):>8.2f}")
    writer.close()
