"""What the benchmarks share: loading a script by path, this machine's description, timing, peak memory, tables."""

import ctypes
import importlib.util
import math
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(filename):
    """The module of a top-level script, by its file name (its main work sits under `if __name__ == "__main__"`):
    each script stands alone, so the benchmarks load it as the tests import it, not through a shared package."""
    path = os.path.join(ROOT, filename)
    spec = importlib.util.spec_from_file_location(filename[: -len(".py")], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fail(message):
    """Bad input: one line on stderr, exit 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    """The device of --device; cuda without a usable GPU is a one-line error (exit 2), never a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        fail(f"--device cuda: no CUDA device found (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return torch.device(name)


def set_threads(threads):
    """--threads: torch's default for 0, else that many; a negative count is a one-line error."""
    if threads < 0:
        fail(f"--threads must be at least 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def save_figure(fig, path, dpi):
    """The figure written whole to a temp file, then renamed over `path`: never a half-written figure."""
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    print(f"figure saved to {path}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # otherwise we would time kernel launches, not work


def machine(device=torch.device("cpu")):
    """CPU model, cores, torch version and threads (and the GPU): the context every printed number needs."""
    model = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    gpu = (
        f"; device {device}: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    )
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads{gpu}"


def min_times(fns, repeats, warmup=1, device=torch.device("cpu")):
    """Minimum wall time in seconds of each of `fns` (name -> callable). The calls go round-robin, so load
    from other processes hits every candidate alike; the minimum is the least disturbed run."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _linux_status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_memory(fn, device=torch.device("cpu")):
    """(peak bytes of memory that fn adds above what was in use before it, fn's result). On a GPU: the device
    memory torch allocates (torch.cuda.max_memory_allocated). On the CPU: resident memory, as follows.

    Linux: resets the process's resident high-water mark (VmHWM) and reads it after the call. glibc
    is told to give every allocation above 64 KiB its own mapping, returned to the system when freed,
    and to release free memory before the call, so resident memory follows live tensors. That slows
    allocation for the rest of the process: time before measuring memory, not after. NaN where /proc is missing.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    if not os.path.exists("/proc/self/clear_refs"):
        return math.nan, fn()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: fixed, so no freed block stays resident
    libc.malloc_trim(0)  # release what earlier runs freed but kept resident
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _linux_status("VmRSS")
    result = fn()
    return _linux_status("VmHWM") - before, result


def print_table(headers, rows):
    """A plain-text table with right-aligned columns (rows hold strings)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()
