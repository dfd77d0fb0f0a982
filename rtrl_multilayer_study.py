"""Exact RTRL for stacked element-wise LSTMs and what its cheap approximations lose.

Irie, Gopalakrishnan, Schmidhuber, "Exploring the Promise and Limits of Real-Time Recurrent
Learning", ICLR 2024 (arXiv 2305.19044), the multi-layer limit (Method §4). One eLSTM layer has
element-wise sensitivities, O(N D) per step. Stacking breaks that: c^2 reads all of h^1, so
dc^2/dtheta^1 is dense. This script implements exact multi-layer RTRL (equal to BPTT for every
parameter) around the ELSTM of the training scripts, compares the gradients of per-layer RTRL,
RTRL-top + truncated BPTT and truncated BPTT with the exact one, and trains all of them fully
online on a copy task and on a partially observed EnvPool task. It writes data, tables and plots;
the conclusions are in the README. Time and memory against N and L: bench/multilayer_cost.py.

    python rtrl_multilayer_study.py --quick --out-dir docs/multilayer_study   # the committed report
"""

import copy
import json
import os
import sys
import time
import warnings
from collections import namedtuple
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

matplotlib.use("Agg")  # plots go to files; no display needed
import matplotlib.pyplot as plt

Method = Literal["rtrl", "rtrl-local", "rtrl-top+tbptt", "tbptt", "frozen-lower"]
METHODS = get_args(Method)


@dataclass
class Args:
    seed: int = 1
    """seed of the experiment (copy-task and RL runs use seed, seed + 1, ...)"""
    cuda: bool = False
    """use a GPU when available; off by default: at batch 16 the per-token work is launch-bound on a GPU"""
    out_dir: str = "runs/multilayer_study"
    """where results.json, the plots and report.md are written"""
    quick: bool = False
    """smaller sizes for the whole report in minutes on 2 CPU cores (a K = 3 copy task with N = 16 and 1000
    sequences, 100k RL steps, 2-3 seeds); flags you pass still win"""
    studies: tuple[Literal["gradients", "copy", "rl"], ...] = ("gradients", "copy", "rl")
    """which parts to run: gradients, copy, rl"""
    num_layers: int = 2
    """L, the depth of the copy-task, gradient-table and RL networks"""
    tbptt_k: int = 4
    """truncation of tbptt and rtrl-top+tbptt: each token's loss is backpropagated through its last k steps
    (the copy task); RL backpropagates through each rollout instead"""
    learning_rate: float = 1e-2
    """Adam learning rate of the copy task and the RL agent"""

    # Copy task: fully online, one update after every token that carries a loss
    methods: tuple[Method, ...] = METHODS
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

    # RL: A2C (the loss of rtrl_a2c_atari.py, with Adam) with an L-layer core, on CartPole without the velocities
    rl_methods: tuple[Method, ...] = ("rtrl", "rtrl-local", "tbptt")
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


# ---------------------------------------------------------------------------------------------
# The element-wise LSTM and its exact RTRL (Method §1-3): the same text as in rtrl_a2c_atari.py
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


# ---------------------------------------------------------------------------------------------
# Stacked eLSTMs and their exact RTRL (Method §4)
# ---------------------------------------------------------------------------------------------
Layer = namedtuple("Layer", "x c o scan")  # one layer over a chunk: input h^{l-1}, c, gate o, cell.scan (or None)


class ELSTMStack(nn.Module):
    """L eLSTM layers; layer l+1 reads h^l = o^l * c^l, o^l = sigmoid(W_o^l [x^l ; c^l] + b_o^l) (Method §1, §4).

    Exact RTRL: layer l's cell keeps its element-wise sensitivities dc^l/dtheta^l ("own", ELSTM's own RTRL). Every
    upper layer m > l carries a dense dc^m/dtheta^l, B x N x P_l ("cross"), over the P_l flattened parameters of
    layer l in `layer_params` order: its cell, then its gate, which reaches c^m through h^l. The top gate is
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

    def _layers(self, x, c0s, done, scan=False):
        """Every layer over the chunk (x: T x B x D, done: T x B) and h^L. scan=True: each layer keeps its cell's
        `scan` (no autograd), what RTRL reads; otherwise the c's are differentiable by autograd."""
        layers = []
        for cell, gate, c0 in zip(self.cells, self.gates, c0s):
            s = cell.scan(x, c0, done) if scan else None
            c = cell(x, c0, done) if s is None else s[0]
            h, o = self._gated(gate, x, c)
            layers.append(Layer(x, c, o, s))
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
            if local and l > 0:  # the T x B steps as the batch rows of one step, each from its (reset) c_{t-1}
                c_prev = layer.scan[1]
                T, B, N = c_prev.shape
                first = torch.zeros(1, T * B, dtype=torch.bool, device=c_prev.device)
                c = cell(h.reshape(1, T * B, -1), c_prev.reshape(T * B, N), first).view(T, B, N)
            else:
                c = layer.c.detach().requires_grad_()
            nodes.append(c)
            h = self._gated(gate, h, c)[0]
        return nodes, h

    def _rtrl(self, layers, sens, dl_dc, method):
        """Gradients of sum_t sum_l <dl_dc[l][t], c^l_t> over the chunk `layers`, and the sensitivities at its end.

        exact: every cell, and the lower gates' path through the upper c's (their path through h^L_t is
        feed-forward backprop), through the whole history. local: each cell by its own element-wise RTRL.
        """
        if method == "local" or len(self.cells) == 1:  # no cross-layer sensitivities: Method §2-3 per layer
            grads, own = {}, []
            for l, (cell, ly) in enumerate(zip(self.cells, layers)):
                g, s, _ = cell.rtrl_scan(ly.x, ly.scan, sens["own"][l], dl_dc[l])
                grads.update({f"cells.{l}.{k}": v for k, v in g.items()}), own.append(s)
            return grads, {"own": own, "cross": sens["cross"]}
        return self._rtrl_exact(layers, sens, dl_dc)

    @staticmethod
    def _jacobian(cell, scan):
        """(a, alpha, beta), T x B x N: J_t zeroed across resets and dc_t / d(z's, f's pre-activation) (Method §2),
        which ELSTM.rtrl_scan computes inside without returning them."""
        _, c_prev, z, f, notdone = scan
        alpha, beta = (1 - f) * (1 - z * z), (c_prev - z) * f * (1 - f)
        return notdone * (f + alpha * cell.v_z + beta * cell.v_f), alpha, beta

    def _rtrl_exact(self, layers, sens, dl_dc):
        """Method §4, step by step (never chunked): the dense recursion needs every layer's sensitivities at every step.

        With K^m_t = dc^m_t/dh^{m-1}_t = alpha^m W_z^m + beta^m W_f^m and H^{m,l}_t = dh^m_t/dtheta^l,
            S^{m,l}_t = a^m_t * S^{m,l}_{t-1} + K^m_t H^{m-1,l}_t
            H^{m,l}_t = G_c^m S^{m,l}_t + G_x^m H^{m-1,l}_t,   G_c = dh/dc, G_x = dh/dx of the gate
        and H^{l,l}_t from layer l's own element-wise sensitivities and its gate (`_lift`).
        """
        num_layers = len(self.cells)
        jacobians = [self._jacobian(cell, ly.scan) for cell, ly in zip(self.cells, layers)]
        own, cross, grads = list(sens["own"]), dict(sens["cross"]), {}
        flat_grads = [0.0] * (num_layers - 1)
        for t in range(layers[0].x.shape[0]):
            for l, (cell, ly) in enumerate(zip(self.cells, layers)):  # the own sensitivities: ELSTM's RTRL, one step
                scan_t = tuple(v[t : t + 1] for v in ly.scan)
                g, own[l], _ = cell.rtrl_scan(ly.x[t : t + 1], scan_t, own[l], dl_dc[l][t : t + 1], impl="step")
                grads.update({f"cells.{l}.{k}": grads.get(f"cells.{l}.{k}", 0) + v for k, v in g.items()})
            step = [self._step_jacobians(l, ly, jacobians[l], t) for l, ly in enumerate(layers)]
            for l in range(num_layers - 1):
                H = None  # H^{m-1,l}_t, once m - 1 > l (H^{l,l}_t stays implicit in `_lift`)
                for m in range(l + 1, num_layers):
                    K = step[m]["K"]
                    cross[m, l] = jacobians[m][0][t][:, :, None] * cross[m, l] + (
                        self._lift(K, own[l], step[l]) if H is None else K @ H
                    )
                    flat_grads[l] = flat_grads[l] + torch.einsum("bn,bnp->p", dl_dc[m][t], cross[m, l])
                    if m < num_layers - 1:
                        G_c, G_x = step[m]["G_c"], step[m]["G_x"]
                        H = G_c @ cross[m, l] + (self._lift(G_x, own[l], step[l]) if H is None else G_x @ H)
        for l, flat in enumerate(flat_grads):
            params = self.layer_params(l)
            for (name, p), g in zip(params, torch.split(flat, [p.numel() for _, p in params])):
                grads[name] = grads.get(name, 0) + g.view_as(p)
        return grads, {"own": own, "cross": cross}

    def _step_jacobians(self, l, layer, jacobian, t):
        """Step t's K = dc^l/dh^{l-1} (B x N x D_l; layers above the first) and, below the top, the gate's
        Jacobians: h = o * c with o = sigmoid(W_x x + W_c c + b) gives dh/dc = diag(o) + g W_c (G_c),
        dh/dx = g W_x (G_x) and dh_k/dW[k, j] = g_k [x ; c]_j, with g = c o (1 - o)."""
        cell, gate, out = self.cells[l], self.gates[l], {}
        if l > 0:
            _, alpha, beta = jacobian
            out["K"] = alpha[t][:, :, None] * cell.w_z + beta[t][:, :, None] * cell.w_f
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


def chunk_gradients(net, x, c0s, done, sens, loss_fn, method):
    """Set every parameter's .grad for loss_fn(h^L_1..T) over one chunk; returns (loss, layers, sens_T).

    rtrl / rtrl-local / frozen-lower: RTRL (exact / local) for the cells, feed-forward backprop for the gates and
    the head with the c's as `instantaneous` nodes. tbptt: autograd through the chunk from the carried, detached
    state. rtrl-top+tbptt: that, but the top cell gets its exact element-wise RTRL (sens: its own sensitivities).
    Each cell's own RTRL runs chunked (Method §3); exact RTRL with L > 1 runs its per-step recursion (Method §4).
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
            x_top, c = top.x.detach(), top.c.detach().requires_grad_()
            (dl_dc,) = torch.autograd.grad(loss_fn(stack._gated(stack.gates[-1], x_top, c)[0]), c)
            grads, sens, _ = cell.rtrl_scan(x_top, cell.scan(x_top, c0s[-1], done), sens, dl_dc)
            for k, p in cell.named_parameters():
                p.grad = grads[k]
        return loss, layers, sens

    with torch.no_grad():
        layers, _ = stack._layers(x, c0s, done, scan=True)
    nodes, h = stack.instantaneous(x, layers, local=method != "rtrl")
    loss = loss_fn(h)
    cell_ids = {id(p) for p in stack.cells.parameters()}
    feedforward = [p for p in net.parameters() if id(p) not in cell_ids]
    grads = torch.autograd.grad(loss, nodes + feedforward, allow_unused=True)
    for p, g in zip(feedforward, grads[len(nodes) :]):
        p.grad = g
    with torch.no_grad():
        kind = "exact" if method == "rtrl" else "local"
        rtrl_grads, sens = stack._rtrl(layers, sens, grads[: len(nodes)], kind)
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


def copy_net(args, device):
    return Net(args.copy_bits + 1, args.copy_hidden_size, args.num_layers, args.copy_bits).to(device)


def train_copy(method, seed, args, device):
    """Online training; returns the bit accuracy of each sequence's recall (measured before each token's
    update, so on unseen data) and the trained network."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = copy_net(args, device)
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


def run_variants(study, methods, seeds, args, run_one, metric):
    """run_one(method, seed, args at the variant's L) -> dict, for every variant and seed; prints `metric`."""
    runs = []
    for label, method, layers in variants(methods, args.num_layers):
        for seed in range(args.seed, args.seed + seeds):
            start = time.time()
            run = dict(method=label, layers=layers, seed=seed, **run_one(method, seed, replace(args, num_layers=layers)))
            runs.append(dict(run, seconds=time.time() - start))
            print(f"{study}: {label} seed {seed}: {metric} {run[metric]:.3f} ({time.time() - start:.0f} s)")
    return runs


def copy_study(args, device):
    """The copy runs, and the first rtrl run's network (for the gradient table's `trained` row)."""
    tokens_per_sequence, trained = 2 * args.copy_length + 1, []

    def run_one(method, seed, run_args):
        accuracy, net = train_copy(method, seed, run_args, device)
        if method == "rtrl" and run_args.num_layers == args.num_layers:
            trained.append(net)
        return dict(
            accuracy=[round(a, 4) for a in accuracy],
            final_accuracy=float(np.mean(accuracy[-max(1, len(accuracy) // 10) :])),
            tokens_to_95=tokens_to_reach(accuracy, 0.95, tokens_per_sequence),
        )

    runs = run_variants("copy", args.methods, args.copy_seeds, args, run_one, "final_accuracy")
    return {"runs": runs, "tokens_per_sequence": tokens_per_sequence}, (trained or [None])[0]


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
            cosine, rel_error = F.cosine_similarity(got, want, 0).item(), ((got - want).norm() / want.norm()).item()
            rows.append(dict(method=method, group=group, cosine=cosine, rel_error=rel_error))
    return rows


def gradient_study(args, device, trained):
    """The gradient table on a fresh network and on `trained` (the first rtrl copy network), and the
    approximations' quality against the stream length and the window k, on `trained` when there is one."""
    torch.manual_seed(args.seed)
    nets = {"init": copy_net(args, device), **({"trained": trained} if trained is not None else {})}
    tables = {label: gradient_table(net, args, device) for label, net in nets.items()}
    for label, r in ((label, r) for label, table in tables.items() for r in table):
        print(f"gradients ({label}): {r['method']} {r['group']}: cosine {r['cosine']:.4f}, rel. error {r['rel_error']:.2e}")
    network = list(nets)[-1]
    methods = tuple(m for m in args.methods if m not in ("rtrl", "frozen-lower"))
    sweeps = {"sequences": ("gradient_sequences", args.gradient_sweep_sequences), "k": ("tbptt_k", args.gradient_sweep_k)}
    rows = []
    for sweep, (field_name, values) in sweeps.items():
        for value in values:
            for row in gradient_table(nets[network], replace(args, methods=methods, **{field_name: value}), device):
                rows.append(dict(row, sweep=sweep, value=value))
        print(f"gradients vs {sweep}: {len(values)} points")
    return tables, {"network": network, "rows": rows}


# ---------------------------------------------------------------------------------------------
# RL: A2C on a partially observed EnvPool task, the loss of rtrl_a2c_atari.py with an L-layer core
# ---------------------------------------------------------------------------------------------
ENV_ID = "CartPole-v1"


class Envs:
    """EnvPool's CartPole with the positions only (the velocities must come from memory), and the agent's view of
    episode ends.

    As AtariEnvs in rtrl_a2c_atari.py: EnvPool answers the step after an episode ends with the next episode's
    first observation and ignores its action, so the step taking the terminal observation has `terminal_obs` (no
    loss, its value bootstraps a truncation) and the step after it is `first` (state and sensitivities reset).
    """

    def __init__(self, seeds, device):
        import envpool

        warnings.filterwarnings("ignore", message=".*precision lowered.*")  # gymnasium's note on CartPole's Box
        self.envs = envpool.make(ENV_ID, env_type="gymnasium", num_envs=len(seeds), env_seed=[int(s) for s in seeds])
        scale = torch.tensor([2.4, 0.2095], device=device)  # the termination thresholds of x and theta
        self.observe = lambda obs: torch.as_tensor(obs[:, [0, 2]], dtype=torch.float32, device=device) / scale
        self.num_actions = self.envs.action_space.n
        self.device = device
        self.obs = self.observe(self.envs.reset()[0])
        self.first = torch.ones(len(seeds), dtype=torch.bool, device=device)
        self.terminal_obs = torch.zeros(len(seeds), dtype=torch.bool, device=device)
        self.episode_return = np.zeros(len(seeds))

    def step(self, action):
        """Returns (reward, terminated) of the step and the returns of the episodes that ended."""
        obs, reward, term, trunc, _ = self.envs.step(action.cpu().numpy())
        self.episode_return += reward
        ended = term | trunc
        episodes = list(self.episode_return[ended])
        self.episode_return[ended] = 0.0
        self.first = self.terminal_obs  # the step after a terminal observation returns a new episode's first one
        self.terminal_obs = torch.as_tensor(ended, device=self.device)
        self.obs = self.observe(obs)
        reward = torch.as_tensor(reward, dtype=torch.float32, device=self.device)
        return reward, torch.as_tensor(term, device=self.device), episodes

    def close(self):
        self.envs.close()


# One rollout of T steps x B envs, each T x B (obs: T x B x D): firsts reset state and sensitivities before the
# step; terminal_obs: the step takes a terminal observation (no loss, its value bootstraps); terms ended their
# episode (no bootstrap).
Rollout = namedtuple("Rollout", "obs firsts terminal_obs actions rewards terms values")


def n_step_returns(rollout, next_value, gamma):
    """G_t = r_t + gamma G_{t+1}, cut by terminations; a terminal observation's G is its value (Method §6: a
    truncated episode bootstraps from it)."""
    returns = torch.empty_like(rollout.values)
    g = next_value
    for t in reversed(range(len(returns))):
        g = rollout.rewards[t] + torch.where(rollout.terms[t], 0.0, gamma * g)
        g = torch.where(rollout.terminal_obs[t], rollout.values[t], g)
        returns[t] = g
    return returns


def a2c_loss(net, h, rollout, returns, args):
    """Policy gradient, value and entropy terms summed over the rollout's live steps (Method §5)."""
    out = net.head(h)
    dist, value = torch.distributions.Categorical(logits=out[..., :-1]), out[..., -1]
    live = (~rollout.terminal_obs).to(value.dtype)
    pg_loss = -(live * dist.log_prob(rollout.actions) * (returns - value).detach()).sum()
    v_loss = 0.5 * (live * (returns - value) ** 2).sum()
    return pg_loss + args.vf_coef * v_loss - args.ent_coef * (live * dist.entropy()).sum()


def env_seeds(seed, n):
    """Distinct per-env seeds derived from the run's seed (Method §6)."""
    return np.random.default_rng(seed).choice(2**31 - 1, size=n, replace=False)


def train_rl(method, seed, args, device):
    """One A2C run; returns the (global step, return) of every finished episode."""
    torch.manual_seed(seed)
    envs = Envs(env_seeds(seed, args.rl_num_envs), device)
    net = Net(envs.obs.shape[-1], args.rl_hidden_size, args.num_layers, envs.num_actions + 1).to(device)
    params = net.trained_params(method)
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    T, B = args.rl_num_steps, args.rl_num_envs
    c, sens = method_state(net.stack, B, method)
    global_step, episodes = 0, []
    for _ in range(args.rl_total_timesteps // (T * B)):
        c0, steps = c, []
        for _ in range(T):
            global_step += B
            obs, first, terminal_obs = envs.obs, envs.first, envs.terminal_obs
            out, c = net.step(obs, c, first)
            action = torch.distributions.Categorical(logits=out[:, :-1]).sample()
            reward, term, ended = envs.step(action)
            steps.append((obs, first, terminal_obs, action, reward, term, out[:, -1]))  # in Rollout's order
            episodes += [(global_step, float(r)) for r in ended]
        rollout = Rollout(*map(torch.stack, zip(*steps)))
        next_value = net.step(envs.obs, c, envs.first)[0][:, -1]  # c itself moves on next rollout
        returns = n_step_returns(rollout, next_value, args.gamma)
        loss_fn = lambda h: a2c_loss(net, h, rollout, returns, args)
        sens = chunk_gradients(net, rollout.obs, c0, rollout.firsts, sens, loss_fn, method)[2]
        nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
    envs.close()
    return episodes


def rl_study(args, device, num_bins=20):
    def run_one(method, seed, run_args):
        steps, returns = np.array(train_rl(method, seed, run_args, device)).reshape(-1, 2).T
        bins = np.minimum(steps * num_bins // (args.rl_total_timesteps + 1), num_bins - 1)
        late = returns[steps > 0.8 * args.rl_total_timesteps]
        return dict(
            curve=[float(returns[bins == b].mean()) if (bins == b).any() else None for b in range(num_bins)],
            num_episodes=len(steps),
            final_return=float(late.mean()) if len(late) else float("nan"),
        )

    runs = run_variants("rl", args.rl_methods, args.rl_seeds, args, run_one, "final_return")
    return {"env_id": ENV_ID, "runs": runs}


# ---------------------------------------------------------------------------------------------
# The report: results.json, plots and report.md of tables (every file written whole, then renamed)
# ---------------------------------------------------------------------------------------------
def write_atomic(path, write):
    """write(tmp) then rename: a crash mid-write never leaves a truncated report file behind."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def save_figure(fig, path):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def by_key(rows, *keys):
    """Rows grouped by their values of `keys` (one key: by that value), in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(r[keys[0]] if len(keys) == 1 else tuple(r[k] for k in keys), []).append(r)
    return out


def plot_copy(copy_results, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, runs in by_key(copy_results["runs"], "method").items():
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
    for method, runs in by_key(rl["runs"], "method").items():
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
        for (method, group), rs in by_key(rows, "method", "group").items():
            ax.plot([r["value"] for r in rs], [r["cosine"] for r in rs], "o-", ms=3, label=f"{method}, {group}")
        ax.set_xscale("log", base=2), ax.set_xlabel(xlabel), ax.set_ylabel("cosine with exact gradient")
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.suptitle(f"gradient quality of the approximations ({sweeps['network']} copy network)")
    save_figure(fig, path)


def mean_sd(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""])


def runs_table(runs, metric, per_seed, extra):
    """One row per method: mean ± sd of `metric`, its value per seed, `extra` (name -> value of the runs), s / run."""
    header = ["method", metric.replace("_", " "), "per seed", *extra, "s / run"]
    rows = [
        [
            m,
            mean_sd([r[metric] for r in rs]),
            ", ".join(per_seed.format(r[metric]) for r in rs),
            *(f(rs) for f in extra.values()),
            f"{np.mean([r['seconds'] for r in rs]):.0f}",
        ]
        for m, rs in by_key(runs, "method").items()
    ]
    return markdown_table(header, rows)


def report_markdown(results):
    args = results["args"]
    lines = [
        "# Multi-layer RTRL study",
        "",
        f"`{results['command']}`",
        "",
        f"{results['machine']} — {results['seconds']:.0f} s in total. What these numbers show: the README, "
        "section rtrl_multilayer_study.py. Cost against N and L: bench/multilayer_cost.py.",
        "",
    ]
    if "gradients" in results:
        tables = results["gradients"]
        groups = list(dict.fromkeys(r["group"] for table in tables.values() for r in table))
        rows = [
            [label, m, *(f"{r['cosine']:.4f} / {r['rel_error']:.1e}" for r in rs)]
            for label, table in tables.items()
            for m, rs in by_key(table, "method").items()
        ]
        lines += [
            "## Gradient quality",
            "",
            f"Each method's per-token gradients summed over {args['gradient_sequences']} copy sequences per "
            f"stream ({args['copy_batch_size']} streams, parameters fixed, float64, k = {args['tbptt_k']}), against "
            "BPTT through the whole stream. Cells: cosine / relative error. `init`: a fresh network; `trained`: the "
            "first rtrl copy-task network.",
            "",
            markdown_table(["network", "method", *groups], rows),
        ]
        sweeps = results["gradient_sweeps"]
        layers = [r for r in sweeps["rows"] if r["group"] != "head"]
        for sweep, name in (
            ("sequences", f"stream length (sequences; k = {args['tbptt_k']})"),
            ("k", f"window k ({args['gradient_sequences']} sequences)"),
        ):
            rows = by_key([r for r in layers if r["sweep"] == sweep], "method", "group")
            values = list(dict.fromkeys(r["value"] for r in layers if r["sweep"] == sweep))
            lines += [
                f"Cosine with the exact gradient, per layer, against {name} ({sweeps['network']} network):",
                "",
                markdown_table(
                    ["method", "layer", *map(str, values)],
                    [[*key, *(f"{r['cosine']:.3f}" for r in rs)] for key, rs in rows.items()],
                ),
            ]
        lines += ["![gradient quality](gradient_quality.png)", ""]
    if "copy" in results:
        never = lambda rs: ", ".join(str(r["tokens_to_95"] or "never") for r in rs)
        lines += [
            "## Copy task (fully online)",
            "",
            f"K = {args['copy_length']} patterns of {args['copy_bits']} bits, N = {args['copy_hidden_size']}, "
            f"L = {args['num_layers']}, {args['copy_batch_size']} streams, {args['copy_sequences']} sequences, "
            f"tbptt k = {args['tbptt_k']}. Recall bit accuracy of each sequence, measured before each token's update; "
            "final: the last 10% of sequences; tokens to 95%: tokens per stream until the 20-sequence average first "
            "reaches 0.95.",
            "",
            runs_table(results["copy"]["runs"], "final_accuracy", "{:.3f}", {"tokens to 95% per seed": never}),
            "![copy accuracy](copy_accuracy.png)",
            "",
        ]
    if "rl" in results:
        episodes = lambda rs: sum(r["num_episodes"] for r in rs)
        lines += [
            "## RL: A2C with the L-layer core",
            "",
            f"{results['rl']['env_id']}, {args['rl_total_timesteps']} steps, {args['rl_num_envs']} envs x "
            f"{args['rl_num_steps']} steps per rollout, N = {args['rl_hidden_size']}; final return: the mean "
            "episode return over the last 20% of the steps.",
            "",
            runs_table(results["rl"]["runs"], "final_return", "{:.1f}", {"episodes": episodes}),
            "![rl returns](rl_returns.png)",
            "",
        ]
    return "\n".join(lines)


def write_report(results, out_dir):
    if "copy" in results:
        plot_copy(results["copy"], os.path.join(out_dir, "copy_accuracy.png"))
    if "gradient_sweeps" in results:
        plot_gradient_sweeps(results["gradient_sweeps"], os.path.join(out_dir, "gradient_quality.png"))
    if "rl" in results:
        plot_rl(results["rl"], results["args"]["rl_total_timesteps"], os.path.join(out_dir, "rl_returns.png"))
    for name, text in (("results.json", json.dumps(results, indent=1)), ("report.md", report_markdown(results))):
        write_atomic(os.path.join(out_dir, name), lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------
# The command line: --quick, and what would run silently wrong as a one-line error
# ---------------------------------------------------------------------------------------------
QUICK = dict(copy_length=3, copy_bits=2, copy_hidden_size=16, copy_sequences=1000, copy_seeds=3, tbptt_k=3)
QUICK |= dict(rl_total_timesteps=100_000, rl_seeds=2)


def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    """The flags (tyro checks the choices); --quick's preset replaces the defaults, so every flag given wins, even
    one equal to a default."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = tyro.cli(Args, args=argv)
    if args.quick:
        args = tyro.cli(Args, args=argv, default=replace(Args(), quick=True, **QUICK))
    for name, value in vars(args).items():  # sizes, counts and rates; the seed and the loss coefficients may be 0
        values, may_be_zero = value if isinstance(value, tuple) else (value,), name in ("seed", "ent_coef", "vf_coef")
        if not values:
            fail(f"--{name.replace('_', '-')} needs at least one value")
        if any(type(v) in (int, float) and (v < 0 or v == 0 and not may_be_zero) for v in values):
            fail(f"--{name.replace('_', '-')} must be {'at least 0' if may_be_zero else 'positive'}, got {value}")
    if args.gamma > 1:
        fail(f"--gamma must be at most 1, got {args.gamma}")
    if args.rl_total_timesteps < args.rl_num_envs * args.rl_num_steps:
        fail(f"--rl-total-timesteps {args.rl_total_timesteps} is less than one rollout (--rl-num-envs x --rl-num-steps)")
    return args


if __name__ == "__main__":
    args = parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(1)  # the small networks gain nothing from more threads, and lose much if cores are shared
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    start = time.time()
    results = {
        "command": " ".join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "args": vars(args),
        "machine": f"torch {torch.__version__}, {device.type}, 1 CPU thread",
    }
    trained = None
    if "copy" in args.studies:
        results["copy"], trained = copy_study(args, device)
    if "gradients" in args.studies:
        results["gradients"], results["gradient_sweeps"] = gradient_study(args, device, trained)
    if "rl" in args.studies:
        results["rl"] = rl_study(args, device)
    results["seconds"] = time.time() - start
    write_report(results, args.out_dir)
    print(f"report written to {os.path.join(args.out_dir, 'report.md')} ({results['seconds']:.0f} s)")
