"""Cost of exact multi-layer RTRL against its approximations, per token, against N and against L.

The learner is rtrl_multilayer_study.py's own (`OnlineLearner` on its `Net`, loaded from the script file):
one per-token online gradient step of exact RTRL (`rtrl`), per-layer RTRL (`rtrl-local`) and truncated BPTT
(`tbptt`, window k), input size D = N, float32. One token per step (T = 1), where chunked and per-step
RTRL are the same recursion; exact RTRL with L > 1 always runs its per-step recursion (Method §4).

Time: the minimum over repeats, the three methods of a configuration called round-robin, so that their
ratios compare runs made side by side. Memory: the peak of tensor storage alive at once among the storages
the learner creates from its empty state through its first k + 1 tokens (state, sensitivities, autograd's
saved tensors, temporaries), not resident memory, which the allocator rounds at these sizes. Exponents:
log-log slopes over the three largest N, beside the theory.

    python bench/multilayer_cost.py --plot docs/multilayer_study/cost.png   # --tiny for a seconds-long smoke run
"""

import os
import weakref
from dataclasses import dataclass
from typing import Literal

import matplotlib
import numpy as np
import torch
import tyro
from common import ROOT, fail, load_script, machine, min_times, pick_device, print_table, save_figure, set_threads
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHODS = ("rtrl", "rtrl-local", "tbptt")


@dataclass
class Args:
    hidden_sizes: tuple[int, ...] = (16, 32, 64, 128)
    """N values of the cost-vs-N sweep"""
    hidden_layers: tuple[int, ...] = (1, 2, 3)
    """L values of the cost-vs-N sweep"""
    layers: tuple[int, ...] = (1, 2, 3, 4)
    """L values of the cost-vs-L sweep"""
    layers_hidden_size: int = 32
    """N of the cost-vs-L sweep"""
    batch_size: int = 4
    """B"""
    tbptt_k: int = 3
    """tbptt's window (each token's loss through its last k steps)"""
    repeats: int = 5
    """timed tokens per method and configuration (the minimum is reported), after one warm-up token"""
    memory_limit_gb: float = 4.0
    """exact RTRL is skipped (and reported as such) where its cross sensitivities alone would exceed this"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where the steps run; cuda: timers synchronize the device"""
    tiny: bool = False
    """tiny sizes for a smoke run (the numbers mean nothing)"""
    seed: int = 0
    """seed of the networks and inputs"""
    plot: str = ""
    """where to save the figure (relative to the repository root); empty: no figure"""


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the storages created inside the `with` block.

    A dispatch mode sees every op's outputs on any device, so this counts what a method allocates and not
    allocator caches, Python objects or the storages that existed before the block (parameters, inputs).
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


def exact_sensitivity_bytes(num_layers, hidden, batch_size):
    """Bytes (float32) of exact RTRL's cross sensitivities, sum over l < m of B x N x P_l, with D = N:
    P_l = 2 N D (w_z, w_f) + 4 N (v, b) + N (D + N) + N (the gate)."""
    p = 2 * hidden * hidden + 4 * hidden + 2 * hidden * hidden + hidden
    return 4 * batch_size * hidden * p * num_layers * (num_layers - 1) // 2


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


def learner_step(study, method, num_layers, hidden, args, device):
    """(one more token's step, peak tensor bytes from the learner's empty state through k + 1 tokens)."""
    torch.manual_seed(args.seed)
    net = study.Net(hidden, hidden, num_layers, 1).to(device)
    xs = torch.randn(args.tbptt_k + 1, args.batch_size, hidden, device=device)
    done = torch.zeros(args.batch_size, dtype=torch.bool, device=device)
    loss_fn = lambda h: net.head(h).square().sum()
    with PeakTensorMemory() as memory:  # a full tbptt window, then one slide
        learner = study.OnlineLearner(net, method, args.tbptt_k, args.batch_size)
        for x in xs:
            learner.step(x, done, loss_fn)
    return (lambda: learner.step(xs[-1], done, loss_fn)), memory.peak


def measure(study, num_layers, hidden, args, device):
    """{method: (seconds per token, peak bytes)} of one configuration, None for a skipped exact RTRL."""
    limit = args.memory_limit_gb * 2**30
    steps, peaks = {}, {}
    for method in METHODS:
        if method != "rtrl" or exact_sensitivity_bytes(num_layers, hidden, args.batch_size) <= limit:
            steps[method], peaks[method] = learner_step(study, method, num_layers, hidden, args, device)
    seconds = min_times(steps, args.repeats, device=device)
    return {m: (seconds[m], peaks[m]) if m in steps else None for m in METHODS}


def cell(value, fmt):
    return "skipped" if value is None else fmt.format(value)


def save_plot(measured, args):
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, (sweep, xlabel) in enumerate((("hidden", "hidden size N (D = N)"), ("layers", "layers L"))):
        for method in METHODS:
            for L in args.hidden_layers if sweep == "hidden" else [None]:
                keys = [key for key in measured[sweep] if L is None or key[0] == L]
                points = [(key[0 if sweep == "layers" else 1], measured[sweep][key][method]) for key in keys]
                points = [(x, v) for x, v in points if v is not None]
                label = method + (f", L={L}" if L is not None else "")
                for ax, i, scale in ((axes[row, 0], 0, 1e3), (axes[row, 1], 1, 2**-20)):
                    ax.plot([x for x, _ in points], [scale * v[i] for _, v in points], "o-", ms=3, label=label)
        ticks = sorted({key[0 if sweep == "layers" else 1] for key in measured[sweep]})
        for ax, ylabel in zip(axes[row], ("ms per token", "peak tensor memory (MB)")):
            ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log", xscale="log" if sweep == "hidden" else "linear")
            ax.set_xticks(ticks, [str(t) for t in ticks]), ax.set_xticks([], minor=True)
            ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.suptitle(f"one per-token online gradient step, B = {args.batch_size}; bottom row: N = {args.layers_hidden_size}")
    fig.tight_layout()
    save_figure(fig, os.path.join(ROOT, args.plot), dpi=90)


def check(args):
    """Bad input: one line on stderr, exit 2."""
    sizes = (*args.hidden_sizes, *args.hidden_layers, *args.layers, args.layers_hidden_size, args.batch_size)
    problem = (
        "every size, L and count must be positive"
        if min(sizes + (args.tbptt_k, args.repeats)) <= 0 or args.memory_limit_gb <= 0
        else "--hidden-sizes, --hidden-layers and --layers need at least one value"
        if not (args.hidden_sizes and args.hidden_layers and args.layers)
        else f"--plot {args.plot}: no such directory"
        if args.plot and not os.path.isdir(os.path.dirname(os.path.join(ROOT, args.plot)))
        else None
    )
    if problem:
        fail(problem)


def main(args):
    if args.tiny:
        args.hidden_sizes, args.hidden_layers, args.layers, args.layers_hidden_size, args.repeats = (
            (4, 6, 8),
            (1, 2),
            (1, 3),
            4,
            1,
        )
    check(args)
    set_threads(args.threads)
    device = pick_device(args.device)
    study = load_script("rtrl_multilayer_study.py")
    print(f"machine: {machine(device)}")
    print(
        f"one per-token step (T = 1), B = {args.batch_size}, D = N, float32, tbptt k = {args.tbptt_k}; time: min over "
        f"{args.repeats} tokens, methods round-robin; memory: peak tensor storage through the first k + 1 tokens"
    )
    sweeps = {
        "hidden": [(L, n) for L in sorted(set(args.hidden_layers)) for n in sorted(set(args.hidden_sizes))],
        "layers": [(L, args.layers_hidden_size) for L in sorted(set(args.layers))],
    }
    measured = {sweep: {key: measure(study, *key, args, device) for key in keys} for sweep, keys in sweeps.items()}
    for sweep, results in measured.items():
        print(f"\ncost against {'N' if sweep == 'hidden' else 'L'}")
        rows = []
        for (L, n), r in results.items():
            ratio = lambda i: cell(r["rtrl"] and r["rtrl"][i] / r["rtrl-local"][i], "{:.1f}x")
            rows.append(
                [L, n, *(cell(r[m] and 1e3 * r[m][0], "{:.2f}") for m in METHODS)]
                + [*(cell(r[m] and r[m][1] / 2**20, "{:.4g}") for m in METHODS), ratio(0), ratio(1)]
            )
        print_table(
            ["L", "N", *(f"{m} ms" for m in METHODS), *(f"{m} MB" for m in METHODS), "rtrl/local time", "rtrl/local memory"],
            rows,
        )
    fits = []
    for L in sorted(set(args.hidden_layers)):
        for method in METHODS:
            points = [(n, r[method]) for (l, n), r in measured["hidden"].items() if l == L and r[method]][-3:]
            if len(points) >= 2:
                xs = [n for n, _ in points]
                theory = theory_exponents(method, L)
                slopes = [fit_exponent(xs, [v[i] for _, v in points]) for i in (0, 1)]
                fits.append([method, L, f"{slopes[0]:.2f}", theory[0], f"{slopes[1]:.2f}", theory[1], ", ".join(map(str, xs))])
    print("\ngrowth in N (log-log slope over the three largest N measured)")
    print_table(["method", "L", "time exponent", "theory", "memory exponent", "theory", "fit over N"], fits)
    if args.plot:
        save_plot(measured, args)


if __name__ == "__main__":
    main(tyro.cli(Args))
