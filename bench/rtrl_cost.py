"""Cost of the learner's recurrent gradient pass: chunked RTRL vs per-step RTRL vs autograd BPTT.

For each script's own `ELSTM` (imported from the script file), float32, at the paper's shapes, the
gradient of the same loss sum_t <dl_dc[t], c_t> over one unroll: `rtrl(impl="chunked")`, `rtrl(impl="step")`
(both also fold in the sensitivities carried from earlier unrolls) and autograd through `forward`.

    python bench/rtrl_cost.py                 # --tiny for a seconds-long smoke run
"""

from dataclasses import dataclass

import torch
import tyro
from torch.profiler import profile

from common import load_script, machine, min_times, peak_memory, print_table, rel_err

# script, T (unroll), B (batch), N (hidden), D (input = 256 features + last reward): SPEC §5
SHAPES = [
    ("rtrl_a2c_atari.py", 50, 32, 256, 257),
    ("rtrl_a2c_procgen.py", 50, 32, 256, 257),
    ("rtrl_impala_dmlab.py", 100, 32, 512, 257),
]
TINY = (6, 3, 8, 5)


@dataclass
class Args:
    repeats: int = 10
    """timed runs of chunked RTRL and BPTT (the minimum is reported), after one warm-up run"""
    step_repeats: int = 3
    """timed runs of the slow per-step recursion"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    tiny: bool = False
    """tiny shapes for a smoke run (the numbers mean nothing)"""
    seed: int = 0
    """seed of the random inputs"""
    only: tuple[str, ...] = ()
    """measure only these scripts (e.g. rtrl_a2c_atari.py); all by default"""
    profile: bool = False
    """also print where chunked RTRL and BPTT spend their time, by operator (torch.profiler)"""


def problem(cell, T, B, seed):
    """One unroll's inputs: x, c0, resets, carried sensitivities and the local dL/dc_t."""
    g = torch.Generator().manual_seed(seed)
    N, D = cell.w_z.shape
    x = torch.randn(T, B, D, generator=g)
    c0 = 0.5 * torch.randn(B, N, generator=g)
    done = torch.rand(T, B, generator=g) < 0.02
    dl_dc = torch.randn(T, B, N, generator=g)
    _, sens = cell.initial_state(B)
    sens = {k: 0.1 * torch.randn(s.shape, generator=g) for k, s in sens.items()}  # as if carried
    return x, c0, done, sens, dl_dc


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
    errors = [rel_err(cell.rtrl(x, c0, done, zero_sens, dl_dc, impl=impl)[0][k], expected[k])
              for impl in ("chunked", "step") for k in expected]  # fmt: skip
    return fns, max(errors)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"machine: {machine()}")
    print(f"float32; time: min over {args.repeats} runs after a warm-up ({args.step_repeats} for step); "
          f"memory: peak resident memory the call adds")  # fmt: skip
    measured = []
    for filename, T, B, N, D in SHAPES:
        script = load_script(filename) if not args.only or filename in args.only else None
        if script is None:
            continue
        T, B, N, D = TINY if args.tiny else (T, B, N, D)
        fns, error = passes(script.ELSTM(D, N), T, B, args.seed)
        seconds = min_times({k: fns[k] for k in ("chunked", "bptt")}, args.repeats)
        seconds.update(min_times({"step": fns["step"]}, args.step_repeats))
        measured.append((filename, (T, B, N, D), fns, seconds, error))
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
        memory = {k: peak_memory(fn)[0] for k, fn in fns.items()}
        rows.append([
            filename, f"{T},{B},{N},{D}",
            *(f"{1e3 * seconds[k]:.1f}" for k in ("chunked", "step", "bptt")),
            *(f"{memory[k] / 2**20:.1f}" for k in ("chunked", "step", "bptt")),
            f"{seconds['step'] / seconds['chunked']:.1f}x", f"{seconds['chunked'] / seconds['bptt']:.2f}x",
            f"{error:.0e}",
        ])  # fmt: skip
    print_table(["script", "T,B,N,D", "chunked ms", "step ms", "bptt ms", "chunked MB", "step MB", "bptt MB",
                 "step/chunked", "chunked/bptt", "max rel.err"], rows)  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
