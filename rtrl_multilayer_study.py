"""Exact RTRL for stacked element-wise LSTMs, its cost, and what its cheap approximations lose.

Irie, Gopalakrishnan, Schmidhuber, "Exploring the Promise and Limits of Real-Time Recurrent
Learning", ICLR 2024 (arXiv 2305.19044), the multi-layer limit (Method §4). One eLSTM layer has
element-wise sensitivities, O(N D) per step. Stacking breaks that: c^2 reads all of h^1, so
dc^2/dtheta^1 is dense. This script implements exact multi-layer RTRL (equal to BPTT for every
parameter), measures its time and memory against N and L, compares the gradients of per-layer
RTRL, RTRL-top + truncated BPTT and truncated BPTT with the exact one, and trains all of them
fully online on a copy task and on a partially observed EnvPool task.

    python rtrl_multilayer_study.py --quick --out-dir docs/multilayer_study   # the committed report
"""

import copy
import difflib
import json
import os
import random
import sys
import time
import warnings
import weakref
from collections import namedtuple
from dataclasses import dataclass, fields, replace

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

matplotlib.use("Agg")  # plots go to files; no display needed
import matplotlib.pyplot as plt

METHODS = ("rtrl", "rtrl-local", "rtrl-top+tbptt", "tbptt", "frozen-lower")
STUDIES = ("cost", "gradients", "copy", "rl")


@dataclass
class Args:
    seed: int = 1
    """seed of the experiment (copy-task and RL runs use seed, seed + 1, ...)"""
    cuda: bool = False
    """use a GPU when available; off by default: at batch 16 the per-token work is launch-bound on a GPU, and the
    fitted cost exponents would then measure kernel-launch overhead, not the methods"""
    out_dir: str = "runs/multilayer_study"
    """where results.json, results.csv, the plots and report.md are written"""
    quick: bool = False
    """smaller sizes for the whole report in minutes on 2 CPU cores (cost up to N = 128, a K = 3 copy task with
    N = 16 and 1000 sequences, 100k RL steps, 2-3 seeds); flags you pass still win"""
    studies: tuple[str, ...] = STUDIES
    """which parts to run: cost, gradients, copy, rl"""
    num_layers: int = 2
    """L, the depth of the copy-task, gradient-table and RL networks"""
    tbptt_k: int = 4
    """truncation of tbptt and rtrl-top+tbptt: each token's loss is backpropagated through its last k steps
    (the copy task); RL backpropagates through each rollout instead"""
    learning_rate: float = 1e-2
    """Adam learning rate of the copy task and the RL agent"""

    # Cost: one per-token online gradient step, input size D = N
    cost_hidden_sizes: tuple[int, ...] = (32, 64, 128, 256)
    """N values of the cost-vs-N sweep"""
    cost_layers: tuple[int, ...] = (1, 2, 3, 4)
    """L values of the cost-vs-L sweep"""
    cost_layers_hidden_size: int = 64
    """N of the cost-vs-L sweep"""
    cost_batch_size: int = 4
    """B of the cost sweeps"""
    cost_steps: int = 10
    """timed tokens per configuration (the median is reported)"""
    cost_memory_limit_gb: float = 4.0
    """configurations whose exact sensitivities alone would exceed this are skipped (and reported as such)"""

    # Copy task: fully online, one update after every token that carries a loss
    methods: tuple[str, ...] = METHODS
    """gradient methods of the copy task and the gradient table: rtrl (exact), rtrl-local, rtrl-top+tbptt,
    tbptt, frozen-lower; with L > 1 and rtrl among them, 1-layer rtrl runs beside them as `rtrl (L=1)`"""
    copy_length: int = 5
    """pattern length K; each sequence is K patterns, a delimiter and K recall steps"""
    copy_bits: int = 4
    """bits per pattern; every pattern bit is a target"""
    copy_hidden_size: int = 32
    """N of the copy-task network"""
    copy_batch_size: int = 16
    """parallel streams (one update per token uses all of them)"""
    copy_sequences: int = 3000
    """sequences per run (tokens per stream = sequences x (2K + 1))"""
    copy_seeds: int = 3
    """runs per method"""
    gradient_sequences: int = 4
    """copy sequences per stream whose summed gradient the gradient table compares (float64)"""
    gradient_sweep_sequences: tuple[int, ...] = (1, 2, 4, 8, 16)
    """stream lengths (in copy sequences) of the gradient-quality-vs-length sweep, at the table's k"""
    gradient_sweep_k: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)
    """truncation windows k of the gradient-quality-vs-k sweep, at the table's stream length"""

    # RL: A2C with carried RTRL sensitivities (as rtrl_a2c_atari.py), on a partially observed EnvPool task
    rl_env_id: str = "CartPole-v1"
    """CartPole-v1 (velocities hidden) or MiniGrid-MemoryS7-v0"""
    rl_methods: tuple[str, ...] = ("rtrl", "rtrl-local", "tbptt")
    """gradient methods of the RL runs (with L > 1 and rtrl among them, also 1-layer rtrl)"""
    rl_seeds: int = 3
    """runs per method"""
    rl_total_timesteps: int = 500_000
    """agent steps over all environments, per run"""
    rl_num_envs: int = 8
    """parallel environments"""
    rl_num_steps: int = 5
    """rollout length (the update interval; RTRL carries its sensitivities across rollouts)"""
    rl_hidden_size: int = 32
    """N of the agent's eLSTM layers"""
    gamma: float = 0.99
    """the discount factor"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    max_grad_norm: float = 1.0
    """the maximum global norm of the RL gradients"""


QUICK = dict(
    cost_hidden_sizes=(16, 32, 64, 128),
    cost_layers_hidden_size=32,
    cost_steps=5,
    copy_length=3,
    copy_bits=2,
    copy_hidden_size=16,
    copy_sequences=1000,
    copy_seeds=3,
    tbptt_k=3,
    rl_total_timesteps=100_000,
    rl_seeds=2,
)


def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_choices(flag, values, choices):
    for value in values:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"choose from {', '.join(choices)}"
            fail(f"unknown {flag} {value!r}; {hint}")


def parse_args(argv=None):
    args = tyro.cli(Args, args=argv)
    if args.quick:  # a preset for the flags left at their defaults
        defaults = Args()
        args = replace(args, **{k: v for k, v in QUICK.items() if getattr(args, k) == getattr(defaults, k)})
    for f in fields(Args):  # every size, count and rate must be positive
        value = getattr(args, f.name)
        numbers = [v for v in (value if isinstance(value, tuple) else (value,)) if type(v) in (int, float)]
        if f.name not in ("seed", "ent_coef", "vf_coef") and any(v <= 0 for v in numbers):
            fail(f"--{f.name.replace('_', '-')} must be positive, got {value}")
    for name in ("studies", "methods", "rl_methods", "cost_hidden_sizes", "cost_layers"):
        if not getattr(args, name):
            fail(f"--{name.replace('_', '-')} needs at least one value")
    check_choices("study", args.studies, STUDIES)
    check_choices("method", args.methods + args.rl_methods, METHODS)
    check_choices("--rl-env-id", (args.rl_env_id,), tuple(OBSERVATIONS))
    if args.gamma > 1 or args.ent_coef < 0 or args.vf_coef < 0:
        fail(f"need --gamma <= 1 and --ent-coef, --vf-coef >= 0; got {args.gamma}, {args.ent_coef}, {args.vf_coef}")
    if args.rl_total_timesteps < args.rl_num_envs * args.rl_num_steps:
        fail(
            f"--rl-total-timesteps {args.rl_total_timesteps} is less than one rollout "
            f"(--rl-num-envs x --rl-num-steps = {args.rl_num_envs * args.rl_num_steps})"
        )
    return args


# ---------------------------------------------------------------------------------------------
# The element-wise LSTM and its exact RTRL (Method §1-3), as in rtrl_a2c_atari.py
# ---------------------------------------------------------------------------------------------
class ELSTM(nn.Module):
    """c_t = f_t * c_{t-1} + (1 - f_t) * z_t, with z, f reading c_{t-1} only element-wise (Method §1).

    The output gate lives outside (ELSTMStack.gates): it needs no sensitivities of its own.
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

    def _project(self, x):
        """The input pre-activations W x + b of z and f, for any leading dims (one GEMM for all steps)."""
        return F.linear(x, self.w_z, self.b_z), F.linear(x, self.w_f, self.b_f)

    def _cell(self, pre_z, pre_f, c_prev):
        """Method §1 from the input pre-activations and the (already reset) c_{t-1}: (c_t, z_t, f_t)."""
        z = torch.tanh(pre_z + self.v_z * c_prev)
        f = torch.sigmoid(pre_f + self.v_f * c_prev)
        return f * c_prev + (1 - f) * z, z, f

    def _scan(self, x, c0, done):
        """The recurrence over T steps; x: T x B x D, c0: B x N, done: T x B (reset before step t)."""
        pre_z, pre_f = self._project(x)
        notdone = (~done.bool()).unsqueeze(-1).to(x.dtype)
        c, cs, c_prevs, zs, fs = c0, [], [], [], []
        for t in range(x.shape[0]):
            c_prev = c * notdone[t]
            c, z, f = self._cell(pre_z[t], pre_f[t], c_prev)
            cs.append(c), c_prevs.append(c_prev), zs.append(z), fs.append(f)
        return torch.stack(cs), torch.stack(c_prevs), torch.stack(zs), torch.stack(fs), notdone

    def forward(self, x, c0, done):
        """c_1..c_T (T x B x N), differentiable by autograd."""
        return self._scan(x, c0, done)[0]

    @torch.no_grad()
    def rtrl(self, x, c0, done, sens, dl_dc, impl="chunked"):
        """Exact gradients of sum_t <dl_dc[t], c_t> through the whole history, and the sensitivities at T.

        `sens` are dc_0/dtheta carried from earlier chunks; dl_dc[t] is the local dL/dc_t (Method §2).
        """
        _, c_prev, z, f, notdone = self._scan(x, c0, done)
        return self._rtrl(x, c_prev, z, f, notdone, sens, dl_dc, impl)

    def _rtrl(self, x, c_prev, z, f, notdone, sens, dl_dc, impl):
        a, u = self._coefficients(c_prev, z, f, notdone)
        rtrl = self._rtrl_chunked if impl == "chunked" else self._rtrl_step
        return rtrl(x, a, u, sens, dl_dc)

    def _coefficients(self, c_prev, z, f, notdone):
        """a_t = notdone_t * J_t and the increments u_t of Method §2 (u of w_z / w_f are alpha / beta)."""
        alpha = (1 - f) * (1 - z * z)  # dc_t / d pre-activation of z
        beta = (c_prev - z) * f * (1 - f)  # dc_t / d pre-activation of f
        a = notdone * (f + alpha * self.v_z + beta * self.v_f)  # J_t, zeroed across resets
        u = {"w_z": alpha, "w_f": beta, "v_z": alpha * c_prev, "v_f": beta * c_prev, "b_z": alpha, "b_f": beta}
        return a, u

    def _rtrl_step(self, x, a, u, sens, dl_dc):
        """Method §2: S_t = J_t * S_{t-1} + u_t (x) x_t;  grad += sum_b delta_t * S_t."""
        grads = {k: torch.zeros_like(p) for k, p in self.named_parameters()}
        for t in range(x.shape[0]):
            sens = self._advance(sens, grads, x[t], a[t], {k: v[t] for k, v in u.items()}, dl_dc[t])
        return grads, sens

    def _advance(self, sens, grads, x, a, u, dl_dc):
        """One step of Method §2 (x: B x D, a: B x N, u: per parameter B x N); adds delta_t * S_t to grads."""
        new = {}
        for k, s in sens.items():
            if k in self.MATRICES:
                new[k] = a[:, :, None] * s + u[k][:, :, None] * x[:, None, :]
                grads[k] += torch.einsum("bn,bnd->nd", dl_dc, new[k])
            else:
                new[k] = a * s + u[k]
                grads[k] += (dl_dc * new[k]).sum(0)
        return new

    def _rtrl_chunked(self, x, a, u, sens, dl_dc):
        """Method §3: the same numbers, reading S_0 once and turning the rest into matrix products."""
        # R_s = delta_s + a_{s+1} R_{s+1}: what step s's sensitivity is worth to the chunk's loss
        R = torch.empty_like(dl_dc)
        R[-1] = dl_dc[-1]
        for t in range(x.shape[0] - 2, -1, -1):
            R[t] = dl_dc[t] + a[t + 1] * R[t + 1]
        # P_s = prod_{r>s} a_r: how step s's increment survives to T (a reverse cumulative product)
        prod_from = torch.cumprod(a.flip(0), 0).flip(0)  # prod_{r>=s} a_r
        P = torch.cat([prod_from[1:], torch.ones_like(a[:1])])
        aR0, aP0 = a[0] * R[0], prod_from[0]
        grads, sens_T = {}, {}
        for k, s0 in sens.items():
            if k in self.MATRICES:
                grads[k] = torch.einsum("bn,bnd->nd", aR0, s0) + torch.einsum("tbn,tbd->nd", u[k] * R, x)
                sens_T[k] = aP0[:, :, None] * s0 + torch.einsum("tbn,tbd->bnd", u[k] * P, x)
            else:
                grads[k] = (aR0 * s0).sum(0) + (u[k] * R).sum((0, 1))
                sens_T[k] = aP0 * s0 + (u[k] * P).sum(0)
        return grads, sens_T


# ---------------------------------------------------------------------------------------------
# Stacked eLSTMs and their exact RTRL (Method §4)
# ---------------------------------------------------------------------------------------------
Layer = namedtuple("Layer", "x c c_prev z f notdone o")  # one layer over a chunk; x is its input h^{l-1}


class ELSTMStack(nn.Module):
    """L eLSTM layers; layer l+1 reads h^l = o^l * c^l, o^l = sigmoid(W_o^l [x^l ; c^l] + b_o^l) (Method §1, §4).

    Exact RTRL: layer l's cell keeps its element-wise sensitivities dc^l/dtheta^l ("own"). Every upper layer
    m > l carries a dense dc^m/dtheta^l, B x N x P_l ("cross"), over the P_l flattened parameters of layer l
    in `layer_params` order: its cell, then its gate, which reaches c^m through h^l. The top gate is
    feed-forward (plain backprop), like the single layer's.
    """

    def __init__(self, input_size, hidden_size, num_layers):
        super().__init__()
        inputs = [input_size] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(ELSTM(d, hidden_size) for d in inputs)
        self.gates = nn.ModuleList(nn.Linear(d + hidden_size, hidden_size) for d in inputs)

    def layer_params(self, l):
        return [(f"cells.{l}.{k}", p) for k, p in self.cells[l].named_parameters()] + [
            (f"gates.{l}.{k}", p) for k, p in self.gates[l].named_parameters()
        ]

    def initial_state(self, batch_size, cross=True):
        """(cs, sens): per-layer zero states; sens = {"own": per-layer ELSTM sensitivities, "cross": {(m, l):
        dc^m/dtheta^l}} (cross only when asked for: exact RTRL is the one method that needs it)."""
        cs, own = map(list, zip(*(cell.initial_state(batch_size) for cell in self.cells)))
        num_layers = len(self.cells)
        sizes = [sum(p.numel() for _, p in self.layer_params(l)) for l in range(num_layers)]
        pairs = [(m, l) for l in range(num_layers) for m in range(l + 1, num_layers)] if cross else []
        return cs, {"own": own, "cross": {(m, l): cs[m].new_zeros(*cs[m].shape, sizes[l]) for m, l in pairs}}

    @staticmethod
    def _gated(gate, x, c):
        """(h, o): h = o * c with the output gate conditioned on c_t (Method §1)."""
        o = torch.sigmoid(gate(torch.cat([x, c], -1)))
        return o * c, o

    def _layers(self, x, c0s, done):
        """Every layer over the chunk (x: T x B x D, done: T x B) and h^L; differentiable by autograd."""
        layers = []
        for cell, gate, c0 in zip(self.cells, self.gates, c0s):
            c, c_prev, z, f, notdone = cell._scan(x, c0, done)
            h, o = self._gated(gate, x, c)
            layers.append(Layer(x, c, c_prev, z, f, notdone, o))
            x = h
        return layers, x

    def forward(self, x, c0s, done):
        """h^L_1..T (T x B x N) and each layer's c_1..c_T."""
        layers, h = self._layers(x, c0s, done)
        return h, [layer.c for layer in layers]

    def instantaneous(self, x, layers, local=False):
        """(nodes, h^L): h^L_t as a function of copies of the c^l_t, whose gradients are RTRL's dl_dc.

        Exact RTRL: every c^l_t is a leaf, so dl_dc[l] is the path through step t's gates only; the path
        through the upper cells is in the cross sensitivities. rtrl-local: an upper c^l_t is layer l's step from
        its fixed c^l_{t-1}, so dl_dc[l] also takes the upper cells' instantaneous path.
        """
        nodes, h = [], x
        for l, (cell, gate, layer) in enumerate(zip(self.cells, self.gates, layers)):
            if local and l > 0:
                c = cell._cell(*cell._project(h), layer.c_prev)[0]
            else:
                c = layer.c.detach().requires_grad_()
            nodes.append(c)
            h = self._gated(gate, h, c)[0]
        return nodes, h

    def _rtrl(self, layers, sens, dl_dc, method, impl):
        """Gradients of sum_t sum_l <dl_dc[l][t], c^l_t> over the chunk `layers`, and the sensitivities at its end.

        exact: every cell, and the lower gates' path through the upper c's (their path through h^L_t is
        feed-forward backprop), through the whole history. local: each cell by its own element-wise RTRL.
        """
        if method == "local" or len(self.cells) == 1:  # no cross-layer sensitivities: Method §2-3 per layer
            grads, own = {}, []
            for l, (cell, ly) in enumerate(zip(self.cells, layers)):
                g, s = cell._rtrl(ly.x, ly.c_prev, ly.z, ly.f, ly.notdone, sens["own"][l], dl_dc[l], impl)
                grads.update({f"cells.{l}.{k}": v for k, v in g.items()}), own.append(s)
            return grads, {"own": own, "cross": sens["cross"]}
        return self._rtrl_exact(layers, sens, dl_dc)

    def _rtrl_exact(self, layers, sens, dl_dc):
        """Method §4, step by step: the dense recursion needs every layer's sensitivities at every step.

        With K^m_t = dc^m_t/dh^{m-1}_t = alpha^m W_z^m + beta^m W_f^m and H^{m,l}_t = dh^m_t/dtheta^l,
            S^{m,l}_t = a^m_t * S^{m,l}_{t-1} + K^m_t H^{m-1,l}_t
            H^{m,l}_t = G_c^m S^{m,l}_t + G_x^m H^{m-1,l}_t,   G_c = dh/dc, G_x = dh/dx of the gate
        and H^{l,l}_t from layer l's own element-wise sensitivities and its gate (`_lift`).
        """
        num_layers = len(self.cells)
        coefs = [cell._coefficients(ly.c_prev, ly.z, ly.f, ly.notdone) for cell, ly in zip(self.cells, layers)]
        own, cross = list(sens["own"]), dict(sens["cross"])
        own_grads = [{k: torch.zeros_like(p) for k, p in cell.named_parameters()} for cell in self.cells]
        flat_grads = [0.0] * (num_layers - 1)
        for t in range(layers[0].x.shape[0]):
            for l, (cell, ly, (a, u)) in enumerate(zip(self.cells, layers, coefs)):
                u_t = {k: v[t] for k, v in u.items()}
                own[l] = cell._advance(own[l], own_grads[l], ly.x[t], a[t], u_t, dl_dc[l][t])
            step = [self._step_jacobians(l, ly, u, t) for l, (ly, (_, u)) in enumerate(zip(layers, coefs))]
            for l in range(num_layers - 1):
                H = None  # H^{m-1,l}_t, once m - 1 > l (H^{l,l}_t stays implicit in `_lift`)
                for m in range(l + 1, num_layers):
                    K = step[m]["K"]
                    cross[m, l] = coefs[m][0][t][:, :, None] * cross[m, l] + (
                        self._lift(K, own[l], step[l]) if H is None else K @ H
                    )
                    flat_grads[l] = flat_grads[l] + torch.einsum("bn,bnp->p", dl_dc[m][t], cross[m, l])
                    if m < num_layers - 1:
                        G_c, G_x = step[m]["G_c"], step[m]["G_x"]
                        H = G_c @ cross[m, l] + (self._lift(G_x, own[l], step[l]) if H is None else G_x @ H)
        grads = {f"cells.{l}.{k}": g for l, gs in enumerate(own_grads) for k, g in gs.items()}
        for l, flat in enumerate(flat_grads):
            params = self.layer_params(l)
            for (name, p), g in zip(params, torch.split(flat, [p.numel() for _, p in params])):
                grads[name] = grads.get(name, 0) + g.view_as(p)
        return grads, {"own": own, "cross": cross}

    def _step_jacobians(self, l, layer, u, t):
        """Step t's K = dc^l/dh^{l-1} (B x N x D_l; layers above the first) and, below the top, the gate's
        Jacobians: h = o * c with o = sigmoid(W_x x + W_c c + b) gives dh/dc = diag(o) + g W_c (G_c),
        dh/dx = g W_x (G_x) and dh_k/dW[k, j] = g_k [x ; c]_j, with g = c o (1 - o)."""
        cell, gate, out = self.cells[l], self.gates[l], {}
        if l > 0:
            out["K"] = u["w_z"][t][:, :, None] * cell.w_z + u["w_f"][t][:, :, None] * cell.w_f
        if l < len(self.cells) - 1:
            x, c, o = layer.x[t], layer.c[t], layer.o[t]
            g = c * o * (1 - o)
            w_x, w_c = gate.weight.split([x.shape[-1], c.shape[-1]], 1)
            out.update(
                G_c=torch.diag_embed(o) + g[:, :, None] * w_c, G_x=g[:, :, None] * w_x, g=g, gate_input=torch.cat([x, c], -1)
            )
        return out

    def _lift(self, R, own, step):
        """R @ H^{l,l}_t (B x M x P_l) without forming H^{l,l}_t, for R: B x M x N.

        dh^l/dtheta^l is G_c times the element-wise own sensitivities (so R G_c scales them) and, for the gate,
        g_k [x ; c]_j on row k only (so R * g scales an outer product): O(M N D), not O(M N^2 D).
        """
        RG, Rg = R @ step["G_c"], R * step["g"][:, None, :]
        cols = [(RG[..., None] * s[:, None]).flatten(2) if s.dim() == 3 else RG * s[:, None] for s in own.values()]
        cols += [(Rg[..., None] * step["gate_input"][:, None, None, :]).flatten(2), Rg]
        return torch.cat(cols, -1)


class Net(nn.Module):
    """An eLSTM stack and a linear head on h^L (the copy task's bit logits; the agent's logits and value)."""

    def __init__(self, input_size, hidden_size, num_layers, output_size):
        super().__init__()
        self.stack = ELSTMStack(input_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, output_size)

    @torch.no_grad()
    def step(self, x, cs, first):
        """One step (x: B x D): (head output, next states)."""
        h, cs = self.stack(x[None], cs, first[None])
        return self.head(h[0]), [c[-1] for c in cs]

    def trained_params(self, method):
        """frozen-lower trains the top layer and the head only: its top layer's local RTRL is exact."""
        if method != "frozen-lower":
            return list(self.parameters())
        top = len(self.stack.cells) - 1
        return [*self.stack.cells[top].parameters(), *self.stack.gates[top].parameters(), *self.head.parameters()]


def chunk_gradients(net, x, c0s, done, sens, loss_fn, method, impl="chunked"):
    """Set every parameter's .grad for loss_fn(h^L_1..T) over one chunk; returns (loss, layers, sens_T).

    rtrl / rtrl-local / frozen-lower: RTRL (exact / local) for the cells, feed-forward backprop for the gates and
    the head with the c's as `instantaneous` nodes. tbptt: autograd through the chunk from the carried, detached
    state. rtrl-top+tbptt: that, but the top cell gets its exact element-wise RTRL (sens: its own sensitivities).
    """
    stack = net.stack
    for p in net.parameters():
        p.grad = None
    if method in ("tbptt", "rtrl-top+tbptt"):
        layers, h = stack._layers(x, c0s, done)
        loss = loss_fn(h)
        loss.backward()
        if method == "rtrl-top+tbptt":
            top, cell = layers[-1], stack.cells[-1]
            c = top.c.detach().requires_grad_()
            (dl_dc,) = torch.autograd.grad(loss_fn(stack._gated(stack.gates[-1], top.x.detach(), c)[0]), c)
            with torch.no_grad():
                detached = (t.detach() for t in (top.x, top.c_prev, top.z, top.f))
                grads, sens = cell._rtrl(*detached, top.notdone, sens, dl_dc, impl)
            for k, p in cell.named_parameters():
                p.grad = grads[k]
        return loss, layers, sens

    with torch.no_grad():
        layers, _ = stack._layers(x, c0s, done)
    nodes, h = stack.instantaneous(x, layers, local=method != "rtrl")
    loss = loss_fn(h)
    cell_ids = {id(p) for p in stack.cells.parameters()}
    feedforward = [p for p in net.parameters() if id(p) not in cell_ids]
    grads = torch.autograd.grad(loss, nodes + feedforward, allow_unused=True)
    for p, g in zip(feedforward, grads[len(nodes) :]):
        p.grad = g
    with torch.no_grad():
        kind = "exact" if method == "rtrl" else "local"
        rtrl_grads, sens = stack._rtrl(layers, sens, grads[: len(nodes)], kind, impl)
    params = dict(stack.named_parameters())
    for name, g in rtrl_grads.items():  # cells: their whole gradient; lower gates: their path through upper c's
        p = params[name]
        p.grad = g if p.grad is None else p.grad + g
    return loss, layers, sens


def method_state(stack, batch_size, method):
    """(c, sens) as chunk_gradients expects them for `method` (rtrl-top+tbptt: the top cell's own sensitivities)."""
    c, sens = stack.initial_state(batch_size, cross=method == "rtrl")
    return c, sens["own"][-1] if method == "rtrl-top+tbptt" else sens


class OnlineLearner:
    """Per-token gradients of one method: what the copy task trains with and the gradient table sums.

    RTRL methods carry (c, sens) token by token. tbptt and rtrl-top+tbptt keep the last k tokens and the state
    before them, and backpropagate each token's loss through that window.
    """

    def __init__(self, net, method, k, batch_size):
        self.net, self.method, self.k = net, method, k
        self.c, self.sens = method_state(net.stack, batch_size, method)
        self.window = []  # (x_t, done_t) of the tbptt window

    def step(self, x, done, loss_fn):
        """One token (x: B x D, done: B): fills .grad for loss_fn(h^L_t) (h: 1 x B x N) and returns the loss."""
        if self.method not in ("tbptt", "rtrl-top+tbptt"):
            loss, layers, self.sens = chunk_gradients(self.net, x[None], self.c, done[None], self.sens, loss_fn, self.method)
            self.c = [layer.c[-1] for layer in layers]
            return loss
        self.window.append((x, done))
        xs, dones = (torch.stack(v) for v in zip(*self.window))
        last_loss = lambda h: loss_fn(h[-1:])
        loss, layers, _ = chunk_gradients(self.net, xs, self.c, dones, self.sens, last_loss, self.method)
        if len(self.window) == self.k:  # slide: the window's start state moves past its oldest token
            if self.method == "rtrl-top+tbptt":
                top = layers[-1]
                self.sens = self.net.stack.cells[-1].rtrl(
                    top.x[:1].detach(), self.c[-1], dones[:1], self.sens, torch.zeros_like(top.c[:1])
                )[1]
            self.c = [layer.c[0].detach() for layer in layers]
            self.window.pop(0)
        return loss


# ---------------------------------------------------------------------------------------------
# Cost: time and peak memory of one per-token online gradient step
# ---------------------------------------------------------------------------------------------
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the storages created inside the `with` block.

    A dispatch mode sees every op's outputs on any device, so this counts what a method allocates (state,
    sensitivities, autograd's saved tensors, temporaries) and not allocator caches, Python objects or the
    storages that existed before the block (parameters, inputs).
    """

    def __enter__(self):
        self.live = self.peak = 0
        self.tracked = set()
        return super().__enter__()

    def _free(self, key, nbytes):
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        key = lambda t: (t.device, t.untyped_storage().data_ptr())
        inputs = {key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or key(t) in inputs or key(t) in self.tracked:
                continue  # views and in-place results alias storage that is already counted (or not ours)
            storage = t.untyped_storage()
            self.tracked.add(key(t))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key(t), storage.nbytes())
        return out


def timer(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # otherwise we would time kernel launches, not work
    return time.perf_counter()


def exact_sensitivity_bytes(num_layers, hidden, batch_size):
    """Bytes (float32) of exact RTRL's cross sensitivities, sum over l < m of B x N x P_l, with D = N:
    P_l = 2 N D (w_z, w_f) + 4 N (v, b) + N (D + N) + N (the gate)."""
    p = 2 * hidden * hidden + 4 * hidden + 2 * hidden * hidden + hidden
    return 4 * batch_size * hidden * p * num_layers * (num_layers - 1) // 2


def measure_cost(method, num_layers, hidden, args, device):
    """(seconds per token, peak tensor bytes) of one method's per-token gradient step with D = N."""
    torch.manual_seed(args.seed)
    B, warmup = args.cost_batch_size, args.tbptt_k + 1  # a full tbptt window, then one slide
    net = Net(hidden, hidden, num_layers, 1).to(device)
    xs = torch.randn(warmup + args.cost_steps, B, hidden, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    loss_fn = lambda h: net.head(h).square().sum()
    with PeakTensorMemory() as memory:  # from the learner's empty state through the warm-up tokens
        learner = OnlineLearner(net, method, args.tbptt_k, B)
        for x in xs[:warmup]:
            learner.step(x, done, loss_fn)
    seconds = []
    for x in xs[warmup:]:
        start = timer(device)
        learner.step(x, done, loss_fn)
        seconds.append(timer(device) - start)
    return float(np.median(seconds)), memory.peak


def theory_exponents(method, num_layers):
    """Growth orders in N (D = N) of time and memory per step. Exact RTRL: dense dc^m/dtheta^l is N x O(N^2);
    for L = 2 `_lift` keeps its update O(N^3); from L = 3 on, G_c^m dc^m/dtheta^l is a dense N x N x O(N^2)
    product. Everything else is O(N^2), the size of the weights."""
    if method != "rtrl" or num_layers == 1:
        return 2, 2
    return (3 if num_layers == 2 else 4), 3


def fit_exponent(xs, ys):
    """Slope of log y against log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def cost_study(args, device):
    limit = args.cost_memory_limit_gb * 2**30
    by_hidden = [("rtrl", 1), ("rtrl", 2), ("rtrl", 3), ("rtrl-local", 2), ("tbptt", 2)]
    configs = [(m, L, n, "hidden") for m, L in by_hidden for n in sorted(set(args.cost_hidden_sizes))]
    configs += [
        (m, L, args.cost_layers_hidden_size, "layers")
        for m in ("rtrl", "rtrl-local", "tbptt")
        for L in sorted(set(args.cost_layers))
    ]
    rows = []
    for method, L, n, sweep in configs:
        row = dict(sweep=sweep, method=method, layers=L, hidden=n, batch=args.cost_batch_size)
        need = exact_sensitivity_bytes(L, n, args.cost_batch_size) if method == "rtrl" else 0
        if need > limit:
            row["skipped"] = f"exact sensitivities alone need {need / 2**30:.1f} GB > --cost-memory-limit-gb"
        else:
            row["seconds_per_token"], row["peak_bytes"] = measure_cost(method, L, n, args, device)
        print(
            f"cost {sweep}: {method} L={L} N={n}: "
            + (row.get("skipped") or f"{1e3 * row['seconds_per_token']:.2f} ms/token, peak {row['peak_bytes'] / 2**20:.2f} MB")
        )
        rows.append(row)
    fits = []
    for method, L in by_hidden:  # fit the three largest N measured, where per-op overheads matter least
        measured = [
            r for r in rows if r["sweep"] == "hidden" and (r["method"], r["layers"]) == (method, L) and "peak_bytes" in r
        ][-3:]
        if len(measured) >= 2:
            xs = [r["hidden"] for r in measured]
            time_theory, memory_theory = theory_exponents(method, L)
            fits.append(
                dict(
                    method=method,
                    layers=L,
                    fit_hidden=xs,
                    time_theory=time_theory,
                    memory_theory=memory_theory,
                    time_exponent=fit_exponent(xs, [r["seconds_per_token"] for r in measured]),
                    memory_exponent=fit_exponent(xs, [r["peak_bytes"] for r in measured]),
                )
            )
    return {"rows": rows, "fits": fits}


# ---------------------------------------------------------------------------------------------
# Copy task, fully online (one update after every token that carries a loss)
# ---------------------------------------------------------------------------------------------
def copy_stream(args, num_sequences, gen, device, dtype=torch.float32):
    """Back-to-back sequences of K random patterns, a delimiter and K blank recall steps.

    Returns x (T x B x bits+1, the last channel marks the delimiter), target (T x B x bits), has_target (T)
    and done (T x B, True at each sequence's first token). Every pattern bit is a target at its recall step;
    the delimiter and the padding are not (Method §6).
    """
    K, bits, B = args.copy_length, args.copy_bits, args.copy_batch_size
    patterns = torch.randint(0, 2, (num_sequences, K, B, bits), generator=gen).to(dtype)
    x = torch.zeros(num_sequences, 2 * K + 1, B, bits + 1, dtype=dtype)
    target = torch.zeros(num_sequences, 2 * K + 1, B, bits, dtype=dtype)
    x[:, :K, :, :bits], x[:, K, :, bits], target[:, K + 1 :] = patterns, 1, patterns
    has_target = torch.zeros(num_sequences, 2 * K + 1, dtype=dtype)
    has_target[:, K + 1 :] = 1
    done = torch.zeros(num_sequences, 2 * K + 1, B, dtype=torch.bool)
    done[:, 0] = True
    return (v.flatten(0, 1).to(device) for v in (x, target, has_target, done))


def copy_loss(net, h, target, has_target):
    """Bit cross-entropy of the recall steps, summed over steps and bits, averaged over streams."""
    per_step = F.binary_cross_entropy_with_logits(net.head(h), target, reduction="none").sum((1, 2))
    return (per_step * has_target).sum() / h.shape[1]


def train_copy(method, seed, args, device):
    """Online training; returns the bit accuracy of each sequence's recall (measured before each token's
    update, so on unseen data) and the trained network."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = Net(args.copy_bits + 1, args.copy_hidden_size, args.num_layers, args.copy_bits).to(device)
    optimizer = torch.optim.Adam(net.trained_params(method), lr=args.learning_rate)
    learner = OnlineLearner(net, method, args.tbptt_k, args.copy_batch_size)
    accuracy = []
    for _ in range(args.copy_sequences):
        x, target, has_target, done = copy_stream(args, 1, gen, device)
        correct = []
        for t in range(len(x)):
            logits = []

            def loss_fn(h):
                logits.append(net.head(h[-1]).detach())
                return copy_loss(net, h, target[t : t + 1], has_target[t : t + 1])

            learner.step(x[t], done[t], loss_fn)
            if has_target[t]:
                correct.append(((logits[0] > 0) == (target[t] > 0.5)).float().mean().item())
                optimizer.step()
        accuracy.append(float(np.mean(correct)))
    return accuracy, net


def tokens_to_reach(accuracy, level, tokens_per_sequence, window=20):
    """Tokens per stream until the accuracy averaged over `window` sequences first reaches `level` (None: never)."""
    window = min(window, len(accuracy))
    hit = np.flatnonzero(np.convolve(accuracy, np.ones(window) / window, mode="valid") >= level)
    return int((hit[0] + window) * tokens_per_sequence) if hit.size else None


def variants(methods, num_layers):
    """(label, method, L) of each run: every method at L layers, and 1-layer exact RTRL beside them, the
    single-layer case that stays cheap (Method §4)."""
    runs = [(m, m, num_layers) for m in methods]
    return runs + [("rtrl (L=1)", "rtrl", 1)] if num_layers > 1 and "rtrl" in methods else runs


def copy_study(args, device):
    runs, trained = [], None
    tokens_per_sequence = 2 * args.copy_length + 1
    for label, method, layers in variants(args.methods, args.num_layers):
        for i in range(args.copy_seeds):
            start = time.time()
            accuracy, net = train_copy(method, args.seed + i, replace(args, num_layers=layers), device)
            final = float(np.mean(accuracy[-max(1, len(accuracy) // 10) :]))
            runs.append(
                dict(
                    method=label,
                    layers=layers,
                    seed=args.seed + i,
                    accuracy=[round(a, 4) for a in accuracy],
                    final_accuracy=final,
                    tokens_to_95=tokens_to_reach(accuracy, 0.95, tokens_per_sequence),
                    seconds=time.time() - start,
                )
            )
            print(f"copy: {label} seed {args.seed + i}: final bit accuracy {final:.3f} ({time.time() - start:.0f} s)")
            if label == "rtrl" and trained is None:
                trained = net
    return {"runs": runs, "tokens_per_sequence": tokens_per_sequence}, trained


# ---------------------------------------------------------------------------------------------
# Gradient quality: each method's summed per-token gradients against BPTT, at fixed parameters
# ---------------------------------------------------------------------------------------------
def layer_of(name):
    """'layer l' (1-based, as in Method §4) for stack.cells.{l-1}.* / stack.gates.{l-1}.*; 'head' otherwise."""
    parts = name.split(".")
    return f"layer {int(parts[2]) + 1}" if parts[0] == "stack" else "head"


def gradient_table(net, args, device):
    """Per layer, cosine and relative error of each method's per-token gradients summed over a stream of copy
    sequences, against BPTT through the whole stream (float64, no parameter updates)."""
    net = copy.deepcopy(net).double()
    gen = torch.Generator().manual_seed(args.seed + 10_000)
    x, target, has_target, done = copy_stream(args, args.gradient_sequences, gen, device, torch.float64)
    names, params = zip(*net.named_parameters())
    c0s = net.stack.initial_state(args.copy_batch_size, cross=False)[0]
    exact = torch.autograd.grad(copy_loss(net, net.stack(x, c0s, done)[0], target, has_target), params)
    rows = []
    for method in (m for m in args.methods if m != "frozen-lower"):  # frozen: no lower-layer gradient at all
        learner = OnlineLearner(net, method, args.tbptt_k, args.copy_batch_size)
        total = [torch.zeros_like(p) for p in params]
        for t in range(len(x)):
            learner.step(x[t], done[t], lambda h: copy_loss(net, h, target[t : t + 1], has_target[t : t + 1]))
            for s, p in zip(total, params):
                s += p.grad
        for group in sorted(set(map(layer_of, names))):
            got, want = (torch.cat([g.flatten() for n, g in zip(names, gs) if layer_of(n) == group]) for gs in (total, exact))
            rows.append(
                dict(
                    method=method,
                    group=group,
                    cosine=F.cosine_similarity(got, want, 0).item(),
                    rel_error=((got - want).norm() / want.norm()).item(),
                )
            )
    return rows


def gradient_study(args, device, trained):
    torch.manual_seed(args.seed)
    nets = {"init": Net(args.copy_bits + 1, args.copy_hidden_size, args.num_layers, args.copy_bits).to(device)}
    if trained is not None:
        nets["trained"] = trained  # the first rtrl copy-task run's network
    tables = {}
    for label, net in nets.items():
        tables[label] = gradient_table(net, args, device)
        for row in tables[label]:
            print(
                f"gradients ({label}): {row['method']} {row['group']}: cosine {row['cosine']:.4f}, "
                f"rel. error {row['rel_error']:.2e}"
            )
    return tables


def gradient_sweeps(args, device, trained):
    """Gradient quality of the approximations against the stream length and against the window k, on the
    trained copy network when there is one (where memory matters), else on a fresh one."""
    torch.manual_seed(args.seed)
    net = trained or Net(args.copy_bits + 1, args.copy_hidden_size, args.num_layers, args.copy_bits).to(device)
    methods = tuple(m for m in args.methods if m not in ("rtrl", "frozen-lower"))
    sweeps = {"sequences": ("gradient_sequences", args.gradient_sweep_sequences), "k": ("tbptt_k", args.gradient_sweep_k)}
    rows = []
    for sweep, (field_name, values) in sweeps.items():
        for value in values:
            for row in gradient_table(net, replace(args, methods=methods, **{field_name: value}), device):
                rows.append(dict(row, sweep=sweep, value=value))
        print(f"gradients vs {sweep}: {len(values)} points")
    return {"network": "trained" if trained is not None else "init", "rows": rows}


# ---------------------------------------------------------------------------------------------
# RL: A2C on a partially observed EnvPool task, the update of rtrl_a2c_atari.py with an L-layer core
# ---------------------------------------------------------------------------------------------
OBSERVATIONS = {
    # positions only: the velocities must come from memory
    "CartPole-v1": lambda obs: obs[:, [0, 2]] / np.array([2.4, 0.2095], dtype=np.float32),
    # the 7x7 egocentric view (object, colour, state ids) and the facing direction
    "MiniGrid-MemoryS7-v0": lambda obs: np.concatenate(
        [obs["image"].reshape(len(obs["image"]), -1) / 10.0, np.eye(4)[obs["direction"]]], 1
    ),
}


class Envs:
    """EnvPool with the study's partial observations and the agent's view of episode ends.

    As AtariEnvs in rtrl_a2c_atari.py: EnvPool answers the step after an episode ends with the next episode's
    first observation and ignores its action, so the step taking the terminal observation is `dead` (no loss,
    its value bootstraps a truncation) and the step after it is `first` (state and sensitivities reset).
    """

    def __init__(self, env_id, seeds, device):
        import envpool

        warnings.filterwarnings("ignore", message=".*precision lowered.*")  # gymnasium's note on CartPole's Box
        self.envs = envpool.make(env_id, env_type="gymnasium", num_envs=len(seeds), env_seed=[int(s) for s in seeds])
        self.observe = lambda obs: torch.as_tensor(OBSERVATIONS[env_id](obs), dtype=torch.float32, device=device)
        self.num_actions = self.envs.action_space.n
        self.device = device
        self.obs = self.observe(self.envs.reset()[0])
        self.first = torch.ones(len(seeds), dtype=torch.bool, device=device)
        self.dead = torch.zeros(len(seeds), dtype=torch.bool, device=device)
        self.episode_return = np.zeros(len(seeds))

    def step(self, action):
        """Returns (reward, terminated) of the step and the (return, length) of episodes that ended."""
        obs, reward, term, trunc, info = self.envs.step(action.cpu().numpy())
        self.episode_return += reward
        episodes = []
        for i in np.flatnonzero(term | trunc):
            episodes.append((self.episode_return[i], int(info["elapsed_step"][i])))
            self.episode_return[i] = 0.0
        self.first = self.dead  # the step after a dead one returns a new episode's first observation
        self.dead = torch.as_tensor(term | trunc, device=self.device)
        self.obs = self.observe(obs)
        reward = torch.as_tensor(reward, dtype=torch.float32, device=self.device)
        return reward, torch.as_tensor(term, device=self.device), episodes

    def close(self):
        self.envs.close()


@dataclass
class Rollout:
    """What one rollout of T steps x B envs keeps for the update."""

    obs: torch.Tensor  # T x B x D, the observation features
    firsts: torch.Tensor  # T x B, reset state and sensitivities before the step
    deads: torch.Tensor  # T x B, the observation is terminal: no loss, its value bootstraps
    actions: torch.Tensor  # T x B
    rewards: torch.Tensor  # T x B
    terms: torch.Tensor  # T x B, the step ended its episode (no bootstrap)
    values: torch.Tensor  # T x B


def n_step_returns(rollout, next_value, gamma):
    """G_t = r_t + gamma G_{t+1}, cut by terminations; a dead step's G is its value (Method §6: a truncated
    episode bootstraps from its terminal observation)."""
    returns = torch.empty_like(rollout.values)
    g = next_value
    for t in reversed(range(len(returns))):
        g = rollout.rewards[t] + torch.where(rollout.terms[t], 0.0, gamma * g)
        g = torch.where(rollout.deads[t], rollout.values[t], g)
        returns[t] = g
    return returns


def a2c_loss(net, h, rollout, returns, args):
    """Policy gradient, value and entropy terms summed over the rollout's live steps (Method §5); (loss, stats)."""
    out = net.head(h)
    dist, value = torch.distributions.Categorical(logits=out[..., :-1]), out[..., -1]
    live = (~rollout.deads).to(value.dtype)
    advantages = (returns - value).detach()
    pg_loss = -(live * dist.log_prob(rollout.actions) * advantages).sum()
    v_loss = 0.5 * (live * (returns - value) ** 2).sum()
    entropy = (live * dist.entropy()).sum()
    stats = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.item()}
    return pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy, stats


def rl_gradients(net, rollout, returns, c0s, sens, method, args):
    """Fill every parameter's .grad for one rollout's loss; return (stats, carried sensitivities)."""
    stats = {}

    def loss_fn(h):
        loss, s = a2c_loss(net, h, rollout, returns, args)
        stats.update(s)
        return loss

    _, _, sens = chunk_gradients(net, rollout.obs, c0s, rollout.firsts, sens, loss_fn, method)
    return stats, sens


def env_seeds(seed, n):
    """Distinct per-env seeds derived from the run's seed (Method §6)."""
    return np.random.default_rng(seed).choice(2**31 - 1, size=n, replace=False)


def train_rl(method, seed, args, device):
    """One A2C run; returns the (global step, return, length) of every finished episode."""
    torch.manual_seed(seed)
    envs = Envs(args.rl_env_id, env_seeds(seed, args.rl_num_envs), device)
    net = Net(envs.obs.shape[-1], args.rl_hidden_size, args.num_layers, envs.num_actions + 1).to(device)
    params = net.trained_params(method)
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    T, B = args.rl_num_steps, args.rl_num_envs
    zeros = lambda dtype=torch.float32: torch.zeros((T, B), dtype=dtype, device=device)
    rollout = Rollout(
        obs=torch.zeros((T, *envs.obs.shape), device=device),
        firsts=zeros(torch.bool),
        deads=zeros(torch.bool),
        actions=zeros(torch.long),
        rewards=zeros(),
        terms=zeros(torch.bool),
        values=zeros(),
    )
    c, sens = method_state(net.stack, B, method)
    global_step, episodes = 0, []
    for _ in range(args.rl_total_timesteps // (T * B)):
        c0 = c
        for step in range(T):
            global_step += B
            rollout.obs[step], rollout.firsts[step], rollout.deads[step] = envs.obs, envs.first, envs.dead
            out, c = net.step(envs.obs, c, envs.first)
            action = torch.distributions.Categorical(logits=out[:, :-1]).sample()
            rollout.actions[step], rollout.values[step] = action, out[:, -1]
            rollout.rewards[step], rollout.terms[step], ended = envs.step(action)
            episodes += [(global_step, float(r), length) for r, length in ended]
        next_value = net.step(envs.obs, c, envs.first)[0][:, -1]  # c itself moves on next rollout
        returns = n_step_returns(rollout, next_value, args.gamma)
        _, sens = rl_gradients(net, rollout, returns, c0, sens, method, args)
        nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
    envs.close()
    return episodes


def rl_study(args, device, num_bins=20):
    runs = []
    for label, method, layers in variants(args.rl_methods, args.num_layers):
        for i in range(args.rl_seeds):
            start = time.time()
            episodes = train_rl(method, args.seed + i, replace(args, num_layers=layers), device)
            steps, returns = (np.array([e[k] for e in episodes]) for k in (0, 1))
            bins = np.minimum(steps * num_bins // (args.rl_total_timesteps + 1), num_bins - 1)
            curve = [float(returns[bins == b].mean()) if (bins == b).any() else None for b in range(num_bins)]
            late = returns[steps > 0.8 * args.rl_total_timesteps]
            final = float(late.mean()) if len(late) else float("nan")
            runs.append(
                dict(
                    method=label,
                    layers=layers,
                    seed=args.seed + i,
                    curve=curve,
                    num_episodes=len(episodes),
                    final_return=final,
                    seconds=time.time() - start,
                )
            )
            print(
                f"rl: {label} seed {args.seed + i}: mean return over the last 20% of steps {final:.1f} "
                f"({len(episodes)} episodes, {time.time() - start:.0f} s)"
            )
    return {"env_id": args.rl_env_id, "runs": runs}


# ---------------------------------------------------------------------------------------------
# The report: results.json, results.csv, plots, report.md (every file written atomically)
# ---------------------------------------------------------------------------------------------
def write_atomic(path, write):
    """write(tmp) then rename: a crash mid-write never leaves a truncated report file behind."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def save_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def csv_rows(results):
    """One long table: study, method, layers, hidden, seed, group, metric, value."""
    rows = []

    def add(study, metric, value, **key):
        rows.append({"study": study, "metric": metric, "value": value, **key})

    for r in results.get("cost", {}).get("rows", []):
        for metric in ("seconds_per_token", "peak_bytes"):
            if metric in r:
                add(f"cost_vs_{r['sweep']}", metric, r[metric], method=r["method"], layers=r["layers"], hidden=r["hidden"])
    for f in results.get("cost", {}).get("fits", []):
        for metric in ("time_exponent", "time_theory", "memory_exponent", "memory_theory"):
            add("cost_fit", metric, f[metric], method=f["method"], layers=f["layers"])
    args = results["args"]
    for label, table in results.get("gradients", {}).items():
        for r in table:
            for metric in ("cosine", "rel_error"):
                add(
                    f"gradients_{label}",
                    metric,
                    r[metric],
                    method=r["method"],
                    layers=args["num_layers"],
                    hidden=args["copy_hidden_size"],
                    group=r["group"],
                )
    for r in results.get("gradient_sweeps", {}).get("rows", []):
        for metric in ("cosine", "rel_error"):
            add(
                f"gradients_vs_{r['sweep']}_{r['value']}",
                metric,
                r[metric],
                method=r["method"],
                layers=args["num_layers"],
                hidden=args["copy_hidden_size"],
                group=r["group"],
            )
    for r in results.get("copy", {}).get("runs", []):
        for metric, value in (("final_bit_accuracy", r["final_accuracy"]), ("tokens_to_95", r["tokens_to_95"])):
            add("copy", metric, value, method=r["method"], layers=r["layers"], hidden=args["copy_hidden_size"], seed=r["seed"])
    for r in results.get("rl", {}).get("runs", []):
        add(
            "rl",
            "final_return",
            r["final_return"],
            method=r["method"],
            layers=r["layers"],
            hidden=args["rl_hidden_size"],
            seed=r["seed"],
        )
    columns = ("study", "method", "layers", "hidden", "seed", "group", "metric", "value")
    return "\n".join([",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]) + "\n"


def save_figure(fig, path):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def plot_cost(cost, sweep, path):
    """Time and memory against N ("hidden") or L ("layers"), one line per method (and L)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = {}  # one line per (method, L) against N, per method against L
    for r in cost["rows"]:
        if r["sweep"] == sweep and "peak_bytes" in r:
            lines.setdefault((r["method"], r["layers"] if sweep == "hidden" else None), []).append(r)
    for (method, L), rs in lines.items():
        fit = next((f for f in cost["fits"] if (f["method"], f["layers"]) == (method, L)), None)
        panels = ((axes[0], "seconds_per_token", 1e3, "time"), (axes[1], "peak_bytes", 2**-20, "memory"))
        for ax, metric, scale, kind in panels:
            label = method
            if sweep == "hidden":
                label += f", L={L}"
                label += f"  (N^{fit[kind + '_exponent']:.2f}, theory {fit[kind + '_theory']})" if fit else ""
            ax.plot([r[sweep] for r in rs], [scale * r[metric] for r in rs], "o-", label=label)
    for ax, y_label in zip(axes, ("ms per token", "peak tensor memory (MB)")):
        ax.set_xlabel("hidden size N (input size D = N)" if sweep == "hidden" else "layers L"), ax.set_ylabel(y_label)
        ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
        if sweep == "hidden":
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(sorted({r["layers"] for r in cost["rows"] if r["sweep"] == "layers"}))
    fixed = {r["hidden"] for r in cost["rows"] if r["sweep"] == "layers"}
    fig.suptitle("one per-token online gradient step" + (f", N = {fixed.pop()}" if sweep == "layers" and fixed else ""))
    save_figure(fig, path)


def by_method(runs):
    out = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    return out


def plot_copy(copy_results, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, runs in by_method(copy_results["runs"]).items():
        acc = np.array([r["accuracy"] for r in runs])
        window = max(1, acc.shape[1] // 30)
        smooth = np.array([np.convolve(a, np.ones(window) / window, mode="valid") for a in acc])
        tokens = (np.arange(smooth.shape[1]) + window) * copy_results["tokens_per_sequence"]
        ax.plot(tokens, smooth.mean(0), label=method)
        ax.fill_between(tokens, smooth.min(0), smooth.max(0), alpha=0.2)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("tokens seen per stream"), ax.set_ylabel("recall bit accuracy (online)"), ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_rl(rl, total_steps, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, runs in by_method(rl["runs"]).items():
        curves = np.array([r["curve"] for r in runs], dtype=float)  # None (no episode ended in the bin) -> nan
        steps = (np.arange(curves.shape[1]) + 0.5) * total_steps / curves.shape[1]
        seen = ~np.isnan(curves).all(0)
        ax.plot(steps[seen], np.nanmean(curves[:, seen], 0), "o-", ms=3, label=f"{method} (mean of {len(runs)} seeds)")
    ax.set_xlabel("environment steps"), ax.set_ylabel("episode return"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title(rl["env_id"] + (" (velocities hidden)" if rl["env_id"] == "CartPole-v1" else ""))
    save_figure(fig, path)


def plot_gradient_sweeps(sweeps, path):
    """Cosine with the exact gradient, per layer, against stream length and k."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"sequences": "stream length (copy sequences per stream)", "k": "truncation window k (steps)"}
    for ax, (sweep, xlabel) in zip(axes, labels.items()):
        rows = [r for r in sweeps["rows"] if r["sweep"] == sweep and r["group"] != "head"]
        for (method, group), rs in by_key(rows, ("method", "group")).items():
            ax.plot([r["value"] for r in rs], [r["cosine"] for r in rs], "o-", ms=3, label=f"{method}, {group}")
        ax.set_xscale("log", base=2), ax.set_xlabel(xlabel), ax.set_ylabel("cosine with exact gradient")
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.suptitle(f"gradient quality of the approximations ({sweeps['network']} copy network)")
    save_figure(fig, path)


def by_key(rows, keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def mean_sd(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def cost_section(cost, args):
    fits = cost["fits"]
    lines = [
        "## Cost of one per-token gradient step",
        "",
        "![cost vs N](cost_vs_hidden.png)",
        "",
        "![cost vs L](cost_vs_layers.png)",
        "",
        f"Batch B = {args['cost_batch_size']}, input size D = N, tbptt window k = {args['tbptt_k']}; time is the "
        f"median over {args['cost_steps']} tokens. Peak memory counts every tensor storage alive at once among "
        "those created from the learner's empty state through its first k + 1 tokens (a TorchDispatchMode sees "
        "each op's outputs; parameters, allocator caches and Python objects are not counted). Exponents are "
        "log-log slopes over the three largest N.",
        "",
    ]
    lines.append(
        markdown_table(
            ["method", "L", "time exponent", "theory", "memory exponent", "theory", "fit over N"],
            [
                [
                    f["method"],
                    f["layers"],
                    f"{f['time_exponent']:.2f}",
                    f["time_theory"],
                    f"{f['memory_exponent']:.2f}",
                    f["memory_theory"],
                    ", ".join(map(str, f["fit_hidden"])),
                ]
                for f in fits
            ],
        )
    )
    measured = [r for r in cost["rows"] if "peak_bytes" in r]
    lines += [
        "",
        markdown_table(
            ["sweep", "method", "L", "N", "ms / token", "peak MB"],
            [
                [
                    r["sweep"],
                    r["method"],
                    r["layers"],
                    r["hidden"],
                    f"{1e3 * r['seconds_per_token']:.2f}",
                    f"{r['peak_bytes'] / 2**20:.2f}",
                ]
                for r in measured
            ],
        ),
    ]
    skipped = [r for r in cost["rows"] if "skipped" in r]
    if skipped:
        lines += [
            "",
            "Skipped: " + "; ".join(f"{r['method']} L={r['layers']} N={r['hidden']} ({r['skipped']})" for r in skipped),
        ]
    return lines


def gradient_rows(tables):
    rows = []
    for label, table in tables.items():
        for method in dict.fromkeys(r["method"] for r in table):
            cells = [f"{r['cosine']:.4f} / {r['rel_error']:.1e}" for r in table if r["method"] == method]
            rows.append([label, method, *cells])
    return rows


def findings(results, args):
    """One paragraph per finding, with the run's own numbers."""
    out = []
    cost = results.get("cost")
    if cost and cost["fits"]:
        fit = {(f["method"], f["layers"]): f for f in cost["fits"]}
        exact = [fit[("rtrl", L)] for L in (1, 2, 3) if ("rtrl", L) in fit]
        out.append(
            "**Exact RTRL's cost grows with depth** ([cost_vs_hidden.png](cost_vs_hidden.png), first table). Per "
            "token, its time grows as "
            + ", ".join(f"N^{f['time_exponent']:.2f} for L = {f['layers']}" for f in exact)
            + " (theory "
            + ", ".join(str(f["time_theory"]) for f in exact)
            + ") and its peak memory as "
            + ", ".join(f"N^{f['memory_exponent']:.2f}" for f in exact)
            + " (theory "
            + ", ".join(str(f["memory_theory"]) for f in exact)
            + "), with D = N. Slopes over small N "
            "underestimate the asymptotic order where fixed per-op overheads still dominate the time."
        )
        biggest = {(r["method"], r["layers"]): r for r in cost["rows"] if r["sweep"] == "hidden" and "peak_bytes" in r}
        if ("rtrl", 2) in biggest and ("rtrl-local", 2) in biggest:
            e, l = biggest[("rtrl", 2)], biggest[("rtrl-local", 2)]
            out[-1] += (
                f" At N = {e['hidden']} and L = 2, exact RTRL takes {1e3 * e['seconds_per_token']:.1f} ms and "
                f"{e['peak_bytes'] / 2**20:.1f} MB per token, rtrl-local {1e3 * l['seconds_per_token']:.1f} ms and "
                f"{l['peak_bytes'] / 2**20:.1f} MB at N = {l['hidden']}; "
                "[cost_vs_layers.png](cost_vs_layers.png) shows the growth with L at fixed N."
            )
    tables = results.get("gradients")
    if tables:
        rows = [dict(r, network=label) for label, t in tables.items() for r in t]
        worst = max((r["rel_error"] for r in rows if r["method"] == "rtrl"), default=None)
        lower = [r for r in rows if r["group"] == "layer 1" and r["method"] != "rtrl"]
        text = "**Gradient quality** (gradient table). "
        if worst is not None:
            verdict = "equals BPTT up to float64 rounding" if worst < 1e-10 else "DIFFERS from BPTT (a bug)"
            text += f"Exact RTRL {verdict}: largest relative error {worst:.1e} over all layers and networks. "
        if lower and args["num_layers"] > 1:
            text += (
                "For layer 1 (below the top), cosine with the exact gradient: "
                + "; ".join(f"{r['method']} {r['cosine']:.3f} ({r['network']})" for r in lower)
                + ". "
            )
        top = f"layer {args['num_layers']}"
        exact_top = [r for r in rows if r["group"] == top and r["method"] in ("rtrl-local", "rtrl-top+tbptt")]
        if exact_top and args["num_layers"] > 1:
            text += (
                f"The top layer's gradient is exact in rtrl-local and rtrl-top+tbptt (relative error at most "
                f"{max(r['rel_error'] for r in exact_top):.1e})."
            )
        out.append(text)
    sweeps = results.get("gradient_sweeps")
    if sweeps:
        text = (
            f"**Gradient quality against stream length and window** ([gradient_quality.png](gradient_quality.png), "
            f"{sweeps['network']} network). "
        )
        for (method, group), rs in by_key([r for r in sweeps["rows"] if r["group"] != "head"], ("method", "group")).items():
            by_length = [r["cosine"] for r in rs if r["sweep"] == "sequences"]
            by_k = [(r["value"], r["cosine"]) for r in rs if r["sweep"] == "k"]
            if min(by_length + [c for _, c in by_k]) > 1 - 1e-9:
                continue  # exact for this layer: nothing to say
            text += f"{method}, {group}: cosine {min(by_length):.3f} to {max(by_length):.3f} over stream lengths"
            exact_from = next((k for k, c in by_k if all(c2 > 0.99 for k2, c2 in by_k if k2 >= k)), None)
            if len({round(c, 6) for _, c in by_k}) == 1:
                text += ", independent of k. "
            else:
                text += f"; {min(c for _, c in by_k):.3f} at worst over k" + (
                    f", above 0.99 from k = {exact_from} on. " if exact_from is not None else ". "
                )
        text += (
            f"A copy sequence is {2 * args['copy_length'] + 1} tokens and the state resets between sequences, "
            "so a window that covers one sequence is exact."
        )
        out.append(text)
    copy_results = results.get("copy")
    if copy_results:
        K, k = args["copy_length"], args["tbptt_k"]
        finals = {m: [r["final_accuracy"] for r in rs] for m, rs in by_method(copy_results["runs"]).items()}
        tokens = args["copy_sequences"] * copy_results["tokens_per_sequence"]
        text = (
            f"**Copy task** ([copy_accuracy.png](copy_accuracy.png), copy table). After {tokens} tokens per stream "
            f"({args['copy_batch_size']} streams, K = {K}, {args['copy_bits']} bits, "
            f"N = {args['copy_hidden_size']}, L = {args['num_layers']}; 1 for rtrl (L=1)), "
            "the recall bit accuracy over the last "
            "10% of sequences (mean ± sd over seeds; chance 0.5) is "
            + "; ".join(f"{m} {mean_sd(v)}" for m, v in finals.items())
            + ". "
        )
        reached = {m: [r["tokens_to_95"] for r in rs] for m, rs in by_method(copy_results["runs"]).items()}
        reached = {m: v for m, v in reached.items() if None not in v}
        if reached:
            text += (
                "Where every seed reached 95% (20-sequence average), the median number of tokens per stream to "
                "get there is " + "; ".join(f"{int(np.median(v))} for {m}" for m, v in reached.items()) + ". "
            )
        mean_final = {m: np.mean(v) for m, v in finals.items()}
        if mean_final.get("rtrl-top+tbptt", 1) < mean_final.get("frozen-lower", 0):
            text += (
                "rtrl-top+tbptt ends below frozen-lower although both train the top layer with its exact "
                "gradient; the difference is that rtrl-top+tbptt also moves the lower layer, with truncated "
                "gradients. "
            )
        if k < K + 2 and {"tbptt", "rtrl-top+tbptt"} & set(finals):
            text += (
                f"Every recall step is K + 1 = {K + 1} steps after its pattern step, beyond the tbptt window of "
                f"k = {k} steps: truncated BPTT gives no gradient that connects them, through any layer."
            )
        out.append(text)
    rl = results.get("rl")
    if rl:
        finals = {m: [r["final_return"] for r in rs] for m, rs in by_method(rl["runs"]).items()}
        out.append(
            f"**RL** ([rl_returns.png](rl_returns.png), RL table). On {rl['env_id']}"
            + (" with the velocities hidden" if rl["env_id"] == "CartPole-v1" else "")
            + f", after {args['rl_total_timesteps']} steps the mean episode return over the last 20% of steps is "
            + "; ".join(f"{m} {mean_sd(v)}" for m, v in finals.items())
            + f" ({args['rl_seeds']} seeds each; differences within the seed spread are not evidence either way)."
        )
    return out


def report_markdown(results):
    args = results["args"]
    lines = [
        "# Multi-layer RTRL study",
        "",
        f"`{results['command']}`",
        "",
        f"{results['machine']} — {results['seconds']:.0f} s in total.",
        "",
        "## Findings",
        "",
    ]
    for paragraph in findings(results, args):
        lines += [paragraph, ""]
    if "cost" in results:
        lines += cost_section(results["cost"], args) + [""]
    if "gradients" in results:
        groups = list(dict.fromkeys(r["group"] for table in results["gradients"].values() for r in table))
        lines += [
            "## Gradient quality",
            "",
            f"Each method's per-token gradients summed over {args['gradient_sequences']} copy sequences per "
            f"stream ({args['copy_batch_size']} streams, parameters fixed, float64), against BPTT through the "
            "whole stream. Cells: cosine / relative error. `init`: a fresh network; `trained`: the first rtrl "
            "copy-task network.",
            "",
            markdown_table(["network", "method", *groups], gradient_rows(results["gradients"])),
            "",
        ]
    if "gradient_sweeps" in results:
        sweeps = results["gradient_sweeps"]
        layers = [r for r in sweeps["rows"] if r["group"] != "head"]
        for sweep, fixed in (
            ("sequences", f"k = {args['tbptt_k']}"),
            ("k", f"{args['gradient_sequences']} sequences per stream"),
        ):
            rows = by_key([r for r in layers if r["sweep"] == sweep], ("method", "group"))
            values = list(dict.fromkeys(r["value"] for r in layers if r["sweep"] == sweep))
            name = "stream length (sequences)" if sweep == "sequences" else "window k"
            lines += [
                f"Cosine with the exact gradient, per layer, against {name} ({fixed}; {sweeps['network']} network):",
                "",
                markdown_table(
                    ["method", "layer", *map(str, values)],
                    [[m, g, *(f"{r['cosine']:.3f}" for r in rs)] for (m, g), rs in rows.items()],
                ),
                "",
            ]
        lines += ["![gradient quality](gradient_quality.png)", ""]
    if "copy" in results:
        lines += [
            "## Copy task (fully online)",
            "",
            "![copy accuracy](copy_accuracy.png)",
            "",
            "Recall bit accuracy of each sequence, measured before each token's update. Final: the last 10% of "
            "sequences. Tokens to 95%: tokens per stream until the 20-sequence average first reaches 0.95.",
            "",
            markdown_table(
                ["method", "final bit accuracy", "per seed", "tokens to 95% per seed", "s / run"],
                [
                    [
                        m,
                        mean_sd([r["final_accuracy"] for r in rs]),
                        ", ".join(f"{r['final_accuracy']:.3f}" for r in rs),
                        ", ".join(str(r["tokens_to_95"] or "never") for r in rs),
                        f"{np.mean([r['seconds'] for r in rs]):.0f}",
                    ]
                    for m, rs in by_method(results["copy"]["runs"]).items()
                ],
            ),
            "",
        ]
    if "rl" in results:
        lines += [
            "## RL: A2C with the L-layer core",
            "",
            "![rl returns](rl_returns.png)",
            "",
            markdown_table(
                ["method", "return, last 20% of steps", "per seed", "episodes", "s / run"],
                [
                    [
                        m,
                        mean_sd([r["final_return"] for r in rs]),
                        ", ".join(f"{r['final_return']:.1f}" for r in rs),
                        sum(r["num_episodes"] for r in rs),
                        f"{np.mean([r['seconds'] for r in rs]):.0f}",
                    ]
                    for m, rs in by_method(results["rl"]["runs"]).items()
                ],
            ),
            "",
        ]
    return "\n".join(lines)


def write_report(results, out_dir):
    if "cost" in results:
        plot_cost(results["cost"], "hidden", os.path.join(out_dir, "cost_vs_hidden.png"))
        plot_cost(results["cost"], "layers", os.path.join(out_dir, "cost_vs_layers.png"))
    if "copy" in results:
        plot_copy(results["copy"], os.path.join(out_dir, "copy_accuracy.png"))
    if "gradient_sweeps" in results:
        plot_gradient_sweeps(results["gradient_sweeps"], os.path.join(out_dir, "gradient_quality.png"))
    if "rl" in results:
        plot_rl(results["rl"], results["args"]["rl_total_timesteps"], os.path.join(out_dir, "rl_returns.png"))
    save_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    save_text(os.path.join(out_dir, "results.csv"), csv_rows(results))
    save_text(os.path.join(out_dir, "report.md"), report_markdown(results))


if __name__ == "__main__":
    args = parse_args()
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir!r}: {e.strerror}")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    start = time.time()
    results = {
        "command": " ".join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "args": vars(args),
        "machine": f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} CPU threads for the cost "
        "study and 1 for the others",
    }
    if "cost" in args.studies:
        results["cost"] = cost_study(args, device)
    torch.set_num_threads(1)  # the small networks below gain nothing from more, and lose much if cores are shared
    trained = None
    if "copy" in args.studies:
        results["copy"], trained = copy_study(args, device)
    if "gradients" in args.studies:
        results["gradients"] = gradient_study(args, device, trained)
        results["gradient_sweeps"] = gradient_sweeps(args, device, trained)
    if "rl" in args.studies:
        results["rl"] = rl_study(args, device)
    results["seconds"] = time.time() - start
    write_report(results, args.out_dir)
    print(f"report written to {os.path.join(args.out_dir, 'report.md')} ({results['seconds']:.0f} s)")
