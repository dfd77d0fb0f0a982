"""Cost of the learner's recurrent gradient pass: chunked RTRL vs per-step RTRL vs autograd BPTT.

For each script's own `ELSTM` (imported from the script file), float32, at the paper's shapes, the
gradient of the same loss sum_t <dl_dc[t], c_t> over one unroll: `rtrl(impl="chunked")`, `rtrl(impl="step")`
(both also fold in the sensitivities carried from earlier unrolls) and autograd through `forward`.

Then the pass the updates run, which also gives the stem its gradient through the cell: `scan` and
`rtrl_scan` (chunked, the carried sensitivities updated in place as `compute_gradients` lets it), against
autograd through `forward` returning the weight and the input gradients, at the Atari shapes and at
rtrl_a2c_minigrid.py's, for every script, side by side.

    python bench/rtrl_cost.py                 # --tiny for a seconds-long smoke run
"""

from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from common import load_script, machine, min_times, peak_memory, pick_device, print_table, rel_err, set_threads
from torch.profiler import profile

# script, T (unroll), B (batch), N (hidden), D (input = 256 features + last reward): Method §5
SHAPES = [
    ("rtrl_a2c_atari.py", 50, 32, 256, 257),
    ("rtrl_a2c_procgen.py", 50, 32, 256, 257),
    ("rtrl_impala_dmlab.py", 100, 32, 512, 257),
    ("rtrl_a2c_minigrid.py", 8, 16, 128, 129),  # the MLP encoder's 128 features + last reward
]
# the fused pass (rtrl_scan, with dL/dx) vs BPTT with weight and input gradients: at these shapes, for every script
FUSED_SHAPES = [("Atari", 50, 32, 256, 257), ("MiniGrid", 8, 16, 128, 129)]
TINY = (6, 3, 8, 5)


@dataclass
class Args:
    repeats: int = 10
    """timed runs of chunked RTRL and BPTT (the minimum is reported), after one warm-up run"""
    step_repeats: int = 3
    """timed runs of the slow per-step recursion"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where the passes run; cuda: timers synchronize, memory is torch.cuda.max_memory_allocated"""
    tiny: bool = False
    """tiny shapes for a smoke run (the numbers mean nothing)"""
    seed: int = 0
    """seed of the random inputs"""
    only: tuple[str, ...] = ()
    """measure only these scripts (e.g. rtrl_a2c_atari.py); all by default"""
    profile: bool = False
    """also print where chunked RTRL and BPTT spend their time, by operator (torch.profiler)"""


MEMORY = {"cpu": "peak resident memory", "cuda": "peak CUDA memory allocated"}


def problem(cell, T, B, seed):
    """One unroll's inputs on the cell's device: x, c0, resets, carried sensitivities and the local dL/dc_t
    (drawn on the CPU, so that every device gets the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    N, D = cell.w_z.shape
    x = torch.randn(T, B, D, generator=g)
    c0 = 0.5 * torch.randn(B, N, generator=g)
    done = torch.rand(T, B, generator=g) < 0.02
    dl_dc = torch.randn(T, B, N, generator=g)
    _, sens = cell.initial_state(B)
    sens = {k: 0.1 * torch.randn(s.shape, generator=g).to(s.device) for k, s in sens.items()}  # as if carried
    return *(v.to(cell.w_z.device) for v in (x, c0, done)), sens, dl_dc.to(cell.w_z.device)


def bptt(cell, x, c0, done, dl_dc):
    """Autograd through the unroll: the gradient of the same loss, truncated at the unroll's start."""
    params = list(cell.parameters())
    return dict(zip((k for k, _ in cell.named_parameters()), torch.autograd.grad(cell(x, c0, done), params, dl_dc)))


def passes(cell, T, B, seed):
    """The three passes over one unroll, and the largest relative difference between their gradients."""
    x, c0, done, sens, dl_dc = problem(cell, T, B, seed)
    fns = {
        "chunked": lambda: cell.rtrl(x, c0, done, sens, dl_dc, impl="chunked"),
        "step": lambda: cell.rtrl(x, c0, done, sens, dl_dc, impl="step"),
        "bptt": lambda: bptt(cell, x, c0, done, dl_dc),
    }
    # with no carried sensitivities, RTRL's gradient is BPTT's within the unroll
    zero_sens = {k: torch.zeros_like(s) for k, s in sens.items()}
    expected = bptt(cell, x, c0, done, dl_dc)
    errors = [
        rel_err(cell.rtrl(x, c0, done, zero_sens, dl_dc, impl=impl)[0][k], expected[k])
        for impl in ("chunked", "step")
        for k in expected
    ]
    return fns, max(errors)


def bptt_with_input(cell, x, c0, done, dl_dc):
    """Autograd through the unroll returning what rtrl_scan returns: the weights' gradients and dL/dx."""
    x = x.detach().requires_grad_()
    names = [k for k, _ in cell.named_parameters()]
    dl_dx, *grads = torch.autograd.grad(cell(x, c0, done), [x, *cell.parameters()], dl_dc)
    return dict(zip(names, grads)), dl_dx


def fused_passes(cell, T, B, seed):
    """scan + rtrl_scan as the updates run it, the same out of place, and BPTT with input gradients;
    and the largest relative difference of their weight and input gradients (no carried sensitivities)."""
    x, c0, done, sens, dl_dc = problem(cell, T, B, seed)
    work = {k: s.clone() for k, s in sens.items()}  # overwritten call after call: its values stay bounded
    fns = {
        "fused": lambda: cell.rtrl_scan(x, cell.scan(x, c0, done), work, dl_dc, overwrite=True),
        "fused, copy": lambda: cell.rtrl_scan(x, cell.scan(x, c0, done), sens, dl_dc),
        "bptt": lambda: bptt_with_input(cell, x, c0, done, dl_dc),
    }
    zero_sens = {k: torch.zeros_like(s) for k, s in sens.items()}
    (expected, expected_dx), (grads, _, dl_dx) = (
        bptt_with_input(cell, x, c0, done, dl_dc),
        cell.rtrl_scan(x, cell.scan(x, c0, done), zero_sens, dl_dc),
    )
    return fns, max([rel_err(grads[k], expected[k]) for k in expected] + [rel_err(dl_dx, expected_dx)])


def main(args):
    set_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    print(f"machine: {machine(device)}")
    print(
        f"float32; time: min over {args.repeats} runs after a warm-up ({args.step_repeats} for step); "
        f"memory: {MEMORY[device.type]} the call adds"
    )
    scripts = {f: load_script(f) for f, *_ in SHAPES if not args.only or f in args.only}
    measured = []
    for filename, T, B, N, D in SHAPES:
        if filename not in scripts:
            continue
        script = scripts[filename]
        T, B, N, D = TINY if args.tiny else (T, B, N, D)
        fns, error = passes(script.ELSTM(D, N).to(device), T, B, args.seed)
        seconds = min_times({k: fns[k] for k in ("chunked", "bptt")}, args.repeats, device=device)
        seconds.update(min_times({"step": fns["step"]}, args.step_repeats, device=device))
        measured.append((filename, (T, B, N, D), fns, seconds, error))
    fused = []  # timed here, before any memory is measured: see peak_memory
    for filename, script in scripts.items():
        for label, T, B, N, D in FUSED_SHAPES:
            T, B, N, D = TINY if args.tiny else (T, B, N, D)
            fns, error = fused_passes(script.ELSTM(D, N).to(device), T, B, args.seed)
            seconds = min_times(fns, args.repeats, device=device)
            ratios = (f"{seconds[k] / seconds['bptt']:.2f}x" for k in ("fused", "fused, copy"))
            fused.append(
                [filename, label, f"{T},{B},{N},{D}", *(f"{1e3 * seconds[k]:.2f}" for k in fns), *ratios, f"{error:.0e}"]
            )
    if args.profile:
        for filename, _, fns, _, _ in measured:
            for name in ("chunked", "bptt"):
                with profile() as prof:
                    for _ in range(args.repeats):
                        fns[name]()
                print(f"\n{filename}, {name}: time by operator over {args.repeats} calls")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    rows = []
    for filename, (T, B, N, D), fns, seconds, error in measured:  # memory after all timing: see peak_memory
        memory = {k: peak_memory(fn, device)[0] for k, fn in fns.items()}
        rows.append(
            [
                filename,
                f"{T},{B},{N},{D}",
                *(f"{1e3 * seconds[k]:.1f}" for k in ("chunked", "step", "bptt")),
                *(f"{memory[k] / 2**20:.1f}" for k in ("chunked", "step", "bptt")),
                f"{seconds['step'] / seconds['chunked']:.1f}x",
                f"{seconds['chunked'] / seconds['bptt']:.2f}x",
                f"{error:.0e}",
            ]
        )
    print_table(
        [
            "script",
            "T,B,N,D",
            "chunked ms",
            "step ms",
            "bptt ms",
            "chunked MB",
            "step MB",
            "bptt MB",
            "step/chunked",
            "chunked/bptt",
            "max rel.err",
        ],
        rows,
    )

    print(
        f"\nthe update's pass, which also returns dL/dx: scan + rtrl_scan (chunked; sensitivities updated in "
        f"place, and out of place) vs BPTT with weight and input gradients (forward + backward); min over "
        f"{args.repeats} runs"
    )
    print_table(
        [
            "script",
            "shapes",
            "T,B,N,D",
            "fused ms",
            "fused, copy ms",
            "bptt w+x ms",
            "fused/bptt",
            "fused, copy/bptt",
            "max rel.err",
        ],
        fused,
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
