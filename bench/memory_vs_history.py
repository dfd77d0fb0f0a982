"""Exact gradients over long histories: RTRL's memory stays flat in the history length, BPTT's grows linearly.

The loss is sum_t <dl_dc[t], c_t> over a history of L steps of rtrl_a2c_atari.py's ELSTM, float32. RTRL
streams the history in unrolls with carried sensitivities (`rtrl`, then `forward` for the next unroll's
c_0); BPTT keeps the whole history and its graph, so it runs only while its projected memory fits the
budget. Where both run they give the same gradient (printed). Prints a table and saves a plot.

    python bench/memory_vs_history.py          # --tiny for a seconds-long smoke run
"""

import os
import time
from dataclasses import dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import tyro
from common import (
    ROOT,
    fail,
    load_script,
    machine,
    peak_memory,
    pick_device,
    print_table,
    rel_err,
    save_figure,
    set_threads,
    sync,
)


@dataclass
class Args:
    lengths: tuple[int, ...] = (100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
    """history lengths L (steps)"""
    batch_size: int = 8
    """B"""
    hidden_size: int = 256
    """N (the Atari script's default)"""
    input_size: int = 257
    """D (256 stem features + the last reward)"""
    unroll: int = 50
    """RTRL's unroll (chunk) length"""
    budget_gib: float = 4.0
    """BPTT runs only while its memory, projected linearly from the previous length, stays under this"""
    plot: str = os.path.join("docs", "memory_vs_history.png")
    """where to save the figure (relative to the repository root); empty: no figure"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where the passes run; cuda: timers synchronize, memory is torch.cuda.max_memory_allocated"""
    tiny: bool = False
    """tiny sizes and histories for a smoke run (the numbers mean nothing)"""
    seed: int = 0
    """seed of the random history"""


def history_piece(i, args):
    """Inputs and dL/dc of unroll i, the same whichever method asks (seeded by the unroll's index)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
    x = torch.randn(args.unroll, args.batch_size, args.input_size, generator=g)
    dl_dc = torch.randn(args.unroll, args.batch_size, args.hidden_size, generator=g) / args.unroll
    return x.to(args.device), dl_dc.to(args.device)


def rtrl_grads(cell, length, args):
    """Stream the history: memory holds one unroll, the carried c and the sensitivities."""
    c, sens = cell.initial_state(args.batch_size)
    total = {k: torch.zeros_like(p) for k, p in cell.named_parameters()}
    done = torch.zeros(args.unroll, args.batch_size, dtype=torch.bool, device=args.device)
    for i in range(length // args.unroll):
        x, dl_dc = history_piece(i, args)
        grads, sens = cell.rtrl(x, c, done, sens, dl_dc)
        with torch.no_grad():
            c = cell(x, c, done)[-1]
        for k in total:
            total[k] += grads[k]
    return total


def bptt_grads(cell, length, args):
    """Keep the whole history and backprop through it."""
    x, dl_dc = (torch.cat(parts) for parts in zip(*(history_piece(i, args) for i in range(length // args.unroll))))
    c0, _ = cell.initial_state(args.batch_size)
    done = torch.zeros(length, args.batch_size, dtype=torch.bool, device=args.device)
    names, params = zip(*cell.named_parameters())
    return dict(zip(names, torch.autograd.grad(cell(x, c0, done), params, dl_dc)))


def measured(fn, device):
    """(peak added memory in bytes, seconds, result) of one call."""
    sync(device)
    start = time.perf_counter()
    memory, result = peak_memory(fn, device)
    return memory, time.perf_counter() - start, result


def save_plot(results, args):
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for method, style in (("rtrl", "o-"), ("bptt", "s-")):
        points = [(L, r[method]) for L, r in results if method in r]
        lengths = [L for L, _ in points]
        ax_mem.plot(lengths, [m / 2**20 for _, (m, _) in points], style, label=method.upper())
        ax_time.plot(lengths, [s for _, (_, s) in points], style, label=method.upper())
    ax_mem.axhline(args.budget_gib * 1024, color="gray", ls="--", lw=1, label="BPTT budget")
    ax_mem.set(xscale="log", yscale="log", xlabel="history length (steps)", ylabel="peak added memory (MiB)")
    ax_time.set(xscale="log", yscale="log", xlabel="history length (steps)", ylabel="time (s)")
    for ax in (ax_mem, ax_time):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"exact eLSTM gradients over a history: B={args.batch_size}, N={args.hidden_size}, D={args.input_size}, float32"
    )
    fig.tight_layout()
    save_figure(fig, os.path.join(ROOT, args.plot), dpi=120)


def main(args):
    if args.tiny:
        args.lengths, args.batch_size, args.hidden_size, args.input_size, args.unroll = (8, 16, 32), 2, 6, 5, 4
    set_threads(args.threads)
    if args.budget_gib < 0:
        fail(f"--budget-gib must be at least 0, got {args.budget_gib}")
    bad = [L for L in args.lengths if L < args.unroll or L % args.unroll]
    if bad:
        fail(f"history lengths must be multiples of --unroll {args.unroll}, got {bad}")
    script = load_script("rtrl_a2c_atari.py")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    cell = script.ELSTM(args.input_size, args.hidden_size).to(device)
    print(f"machine: {machine(device)}")
    print(
        f"B={args.batch_size}, N={args.hidden_size}, D={args.input_size}, float32, RTRL unroll {args.unroll}; "
        f"memory: peak {'CUDA memory allocated' if device.type == 'cuda' else 'resident memory'} the call adds; "
        f"BPTT budget {args.budget_gib} GiB"
    )
    rtrl_grads(cell, args.unroll, args), bptt_grads(cell, args.unroll, args)  # warm-up: one-time allocations
    results, rows, bptt_last = [], [], None
    for length in args.lengths:
        result = {"rtrl": measured(lambda: rtrl_grads(cell, length, args), device)}
        projected = bptt_last and bptt_last[1] * length / bptt_last[0]
        if bptt_last is None or projected < args.budget_gib * 2**30:
            result["bptt"] = measured(lambda: bptt_grads(cell, length, args), device)
            bptt_last = (length, result["bptt"][0])
        rtrl_mem, rtrl_s, rtrl_g = result["rtrl"]
        if "bptt" in result:
            bptt_mem, bptt_s, bptt_g = result["bptt"]
            diff = max(rel_err(rtrl_g[k], bptt_g[k]) for k in bptt_g)
            bptt_cells = [f"{bptt_mem / 2**20:.1f}", f"{bptt_s:.2f}", f"{diff:.0e}"]
        else:
            bptt_cells = [f"over budget (projected {projected / 2**30:.1f} GiB)", "-", "-"]
        rows.append([length, f"{rtrl_mem / 2**20:.1f}", f"{rtrl_s:.2f}", *bptt_cells])
        results.append((length, {k: v[:2] for k, v in result.items()}))
    print_table(["L (steps)", "RTRL MiB", "RTRL s", "BPTT MiB", "BPTT s", "max rel.diff"], rows)
    if args.plot:
        save_plot(results, args)


if __name__ == "__main__":
    main(tyro.cli(Args))
