"""The unroll-length study: rtrl_a2c_minigrid.py over env ids x cores x --num-steps x seeds, collected into a report.

Launches the training script as subprocesses, `--jobs` at a time (each with OMP_NUM_THREADS=1), reads their
TensorBoard event files and writes results.json, results.csv, table.md and plots into `--out-dir`. The study is
resumable: each run is recorded in out_dir/runs.jsonl as it finishes, and a restart skips the recorded ones (a
run that was killed mid-way is started again in a fresh directory; a failed one is recorded and retried on the
next start). The report is recomputed from runs.jsonl every time, also by `--report-only`, which launches nothing.
The hyperparameters are the same for every core: pick them with a sweep on the long-unroll TBPTT baseline
(`--set`), then pass them to the study with `--extra`.

    python experiments/unroll_study.py --cores tbptt --num-steps 32 --set learning-rate=3e-4,1e-3,3e-3 \\
        --out-dir docs/unroll_study/sweep                                     # the sweep
    python experiments/unroll_study.py --extra "--learning-rate 1e-3"         # the study, into docs/unroll_study
    python experiments/unroll_study.py --quick                                # a one-minute smoke run (CI)
"""

import csv
import difflib
import fcntl
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Annotated

import matplotlib
import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

matplotlib.use("Agg")  # plots go to files; no display needed
import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = ("rtrl", "tbptt", "lstm", "ff")
GRID_FLAGS = ("--env-id", "--core", "--num-steps", "--seed", "--total-timesteps", "--run-name")  # set by the runner
FINAL_FRACTION = 0.2  # final return/success: the episodes that finish in the last 20% of the steps
CURVE_BINS = 40  # the recorded learning curve: mean return and success in 40 equal bins of steps
DEFAULTS = dict(
    env_ids=("MiniGrid-MemoryS7-v0",), cores=CORES, num_steps=(2, 8, 32), seeds=(1, 2, 3), total_timesteps=1_000_000, extra=""
)
# --quick: 4 runs of ~10 s; a random policy ends an episode every ~170 steps, so the last 20% of 4096 steps hold a few
QUICK = dict(
    env_ids=("MiniGrid-MemoryS7-v0",),
    cores=("rtrl", "tbptt"),
    num_steps=(4, 8),
    seeds=(1,),
    total_timesteps=4096,
    extra="--num-envs 2 --hidden-size 8 --eval-episodes 1",
)


def preset(name, metavar):
    """The help's "(default: ...; --quick: ...)", from DEFAULTS and QUICK: the field itself defaults to None, so that
    --quick can tell a flag left out from one passed (even one passed with the default value)."""

    def show(v):
        return " ".join(map(str, v)) if isinstance(v, tuple) else repr(v) if isinstance(v, str) else v

    hint = f"(default: {show(DEFAULTS[name])}; --quick: {show(QUICK[name])})"
    return tyro.conf.arg(metavar=metavar, help_behavior_hint=hint)


OUT_DIR_HINT = "(default: docs/unroll_study in the repo; --quick: a new temp dir)"
WORK_DIR_HINT = "(default: experiments/work in the repo; --quick: a new temp dir)"


@dataclass
class Args:
    env_ids: Annotated[tuple[str, ...] | None, preset("env_ids", "STR [STR ...]")] = None
    """--env-id values of the grid"""
    cores: Annotated[tuple[str, ...] | None, preset("cores", "{rtrl,tbptt,lstm,ff} [...]")] = None
    """--core values of the grid"""
    num_steps: Annotated[tuple[int, ...] | None, preset("num_steps", "INT [INT ...]")] = None
    """--num-steps values of the grid: the steps per unroll"""
    seeds: Annotated[tuple[int, ...] | None, preset("seeds", "INT [INT ...]")] = None
    """--seed values of the grid"""
    total_timesteps: Annotated[int | None, preset("total_timesteps", "INT")] = None
    """--total-timesteps of every run"""
    extra: Annotated[str | None, preset("extra", "STR")] = None
    """further flags passed to every run, e.g. "--learning-rate 1e-3 --num-envs 16" (with --quick, added to its
    flags and winning over them)"""
    set: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """a swept axis of a script flag, NAME=V1,V2,..., e.g. --set learning-rate=3e-4,1e-3,3e-3; one --set per axis"""
    jobs: int = 2
    """runs at a time"""
    out_dir: Annotated[str | None, tyro.conf.arg(metavar="STR", help_behavior_hint=OUT_DIR_HINT)] = None
    """where runs.jsonl and the report go"""
    work_dir: Annotated[str | None, tyro.conf.arg(metavar="STR", help_behavior_hint=WORK_DIR_HINT)] = None
    """where the runs' runs/NAME directories and NAME.log files go"""
    script: str = os.path.join(ROOT, "rtrl_a2c_minigrid.py")
    """the training script"""
    quick: bool = False
    """a tiny grid for a smoke test (see each flag's --quick value); flags you pass still win"""
    report_only: bool = False
    """launch nothing: rewrite the report from out_dir/runs.jsonl"""


def fail(message):
    """User errors: one line on stderr and exit code 2 (as for a bad flag), no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(text):
    """'--a 1 --b --c=2' -> {'--a': ['1'], '--b': [], '--c': ['2']}: flags in order, each with its values."""
    flags = {}
    for token in shlex.split(text):
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            flags[name] = [value] if eq else []
        elif not flags:
            fail(f"--extra must start with a --flag, got {text!r}")
        else:
            flags[next(reversed(flags))].append(token)
    return flags


def parse_sets(specs):
    """('learning-rate=3e-4,1e-3',) -> {'learning-rate': ['3e-4', '1e-3']}."""
    sets = {}
    for spec in specs:
        name, eq, values = spec.partition("=")
        name = name.removeprefix("--")
        values = values.split(",")
        if not eq or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or not all(values):
            fail(f"--set wants NAME=V1,V2,... (e.g. learning-rate=3e-4,1e-3), got {spec!r}")
        if name in sets:
            fail(f"--set {name} is given twice")
        sets[name] = values
    return sets


def read_flags(cls, argv, defaults, quick):
    """(args, --extra's flags) for this runner and its siblings: the fields left out (None) take `quick`'s values
    with --quick, else `defaults`'; --extra adds to --quick's extra flags and wins over them."""
    argv, i = list(sys.argv[1:] if argv is None else argv), 0
    while i < len(argv) - 1:  # tyro would read the value "--flags ..." of --extra as a flag: hand it `--extra=...`
        if argv[i] == "--extra":
            argv[i : i + 2] = [f"--extra={argv[i + 1]}"]
        i += 1
    args = tyro.cli(cls, args=argv)
    chosen = quick if args.quick else defaults
    args = replace(args, **{k: v for k, v in chosen.items() if getattr(args, k) is None})  # explicit flags win
    extra = parse_flags(args.extra)
    return args, ({**parse_flags(quick["extra"]), **extra} if args.quick else extra)


def place(args, name):
    """The training script checked; out_dir and work_dir by default in the repo, or new temp dirs with --quick."""
    if not args.report_only and not os.path.isfile(args.script):
        fail(f"the training script {args.script} does not exist (see --script)")
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix=f"{name}_") if args.quick else f"{ROOT}/docs/{name}"
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix=f"{name}_work_") if args.quick else f"{ROOT}/experiments/work"


def parse_args(argv=None):
    args, extra = read_flags(Args, argv, DEFAULTS, QUICK)

    for name in ("env_ids", "cores", "num_steps", "seeds"):
        values, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if not values:
            fail(f"{flag} needs at least one value")
        if len(set(values)) < len(values):
            fail(f"{flag} repeats a value: {' '.join(map(str, values))}")
    for core in args.cores:
        if core not in CORES:
            close = difflib.get_close_matches(core, CORES, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"choose from {', '.join(CORES)}"
            fail(f"unknown core {core!r}; {hint}")
    if min(args.num_steps) < 1 or args.total_timesteps < 1:
        fail(f"--num-steps and --total-timesteps must be at least 1, got {args.num_steps} and {args.total_timesteps}")
    if args.jobs < 1:
        fail(f"--jobs must be at least 1, got {args.jobs}")
    sets = parse_sets(args.set)
    for flag in extra:
        if flag in GRID_FLAGS:
            fail(f"--extra may not contain {flag}: the runner sets it (use the grid flags)")
        if flag.removeprefix("--") in sets:
            fail(f"{flag} is both in --extra and in --set")
    for name in sets:
        if f"--{name}" in GRID_FLAGS:
            fail(f"--set may not sweep --{name}: it is a grid flag of its own")
    place(args, "unroll_study")
    extra = [token for flag, values in extra.items() for token in (flag, *values)]
    return args, extra, sets


# ---------------------------------------------------------------------------------------------
# The grid: one config per run, each with a deterministic name
# ---------------------------------------------------------------------------------------------
def grid(args, sets):
    """Every run of the study, seed outermost: a study stopped early has every cell for its first seeds."""
    combos = [dict(zip(sets, values)) for values in itertools.product(*sets.values())]
    return [
        dict(env_id=env_id, core=core, num_steps=num_steps, seed=seed, sets=combo)
        for seed, env_id, combo, num_steps, core in itertools.product(
            args.seeds, args.env_ids, combos, args.num_steps, args.cores
        )
    ]


def run_key(config):
    """The run's name, from its config alone: env__core__ns<unroll>[__flag=value...]__s<seed>."""
    swept = [f"{name}={value}" for name, value in config["sets"].items()]
    parts = [config["env_id"], config["core"], f"ns{config['num_steps']}", *swept, f"s{config['seed']}"]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts))


def script_flags(config, fixed):
    """The run's flags: the grid's, then --extra's, then the swept ones (the runner adds --run-name)."""
    flags = [
        "--env-id",
        config["env_id"],
        "--core",
        config["core"],
        "--num-steps",
        str(config["num_steps"]),
        "--seed",
        str(config["seed"]),
        "--total-timesteps",
        str(fixed["total_timesteps"]),
    ]
    return flags + fixed["extra"] + [token for name, value in config["sets"].items() for token in (f"--{name}", value)]


# ---------------------------------------------------------------------------------------------
# One run: its subprocess, then its metrics from the event file
# ---------------------------------------------------------------------------------------------
def summarize_events(run_dir, total_timesteps):
    """Final return/success (episodes finishing in the last FINAL_FRACTION of the steps), the binned curve,
    the greedy evaluation and the mean SPS, from the run's TensorBoard events."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "charts/episodic_return" not in acc.Tags()["scalars"]:
        raise ValueError(f"no charts/episodic_return events in {run_dir}")

    def series(tag):  # (steps, values), empty if the tag is absent
        events = acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []
        return np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=float)

    def mean(values):
        return float(values.mean()) if len(values) else None

    def final(tag):
        steps, values = series(tag)
        return mean(values[steps >= (1 - FINAL_FRACTION) * total_timesteps])

    def binned(tag):
        steps, values = series(tag)
        bins = np.minimum(steps * CURVE_BINS // total_timesteps, CURVE_BINS - 1)
        return [mean(values[bins == b]) for b in range(CURVE_BINS)]

    steps, _ = series("charts/episodic_return")
    metrics = dict(
        final_return=final("charts/episodic_return"),
        final_success=final("charts/success"),
        final_episodes=int((steps >= (1 - FINAL_FRACTION) * total_timesteps).sum()),
        episodes=len(steps),
        eval_return=mean(series("eval/episodic_return")[1]),
        eval_success=mean(series("eval/success")[1]),
        eval_episodes=len(series("eval/episodic_return")[1]),
        sps=mean(series("charts/SPS")[1]),
    )
    for group in ("", "_stem", "_cell", "_heads"):  # median gradient norms before clipping, per parameter group
        values = series(f"losses/grad_norm{group}")[1]
        metrics[f"median_grad_norm{group}"] = float(np.median(values)) if len(values) else None
    edges = np.linspace(0, total_timesteps, CURVE_BINS + 1)
    curve = dict(
        step=((edges[:-1] + edges[1:]) / 2).round(1).tolist(),  # bin centres
        episodic_return=binned("charts/episodic_return"),
        success=binned("charts/success"),
    )
    return metrics, curve


def log_tail(path, lines=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class Launcher:
    """Starts runs as subprocesses and stops them all on a stop; one instance per study invocation."""

    def __init__(self, args, fixed, study_command, key=run_key, flags=script_flags, summarize=None, members=None):
        """key(config) names a run, flags(config, fixed) gives its flags, summarize(run_dir) its (metrics, curve):
        by default this study's; experiments/memory_study.py passes its own. members(config) lists what one process
        trains, as (key, config, run directory suffix): by default the run itself; a population's agents for
        experiments/memory_study.py (each recorded as a run of its own)."""
        self.args, self.fixed, self.study_command = args, fixed, study_command
        self.key, self.flags = key, flags
        self.members = members or (lambda config: [(key(config), config, "")])
        self.summarize = summarize or (lambda run_dir: summarize_events(run_dir, fixed["total_timesteps"]))
        self.runs_root = os.path.join(os.path.abspath(args.work_dir), "runs")
        self.script = os.path.abspath(args.script)
        self.live, self.lock, self.stopping = set(), threading.Lock(), False

    def new_run_name(self, key, suffixes=("",)):
        """key, key__a2, ...: the first whose run directories (name + each suffix) and log are all new (the log is
        created here, so two launchers never take the same name); a run killed mid-way left its directory, and is
        never reused."""
        for attempt in itertools.count(1):
            name = key if attempt == 1 else f"{key}__a{attempt}"
            if any(os.path.exists(os.path.join(self.runs_root, name + suffix)) for suffix in suffixes):
                continue
            try:
                return name, open(os.path.join(self.runs_root, f"{name}.log"), "x")
            except FileExistsError:
                continue

    def run(self, config):
        """One process; a record for each of its members, failed together if the process failed."""
        key, flags = self.key(config), self.flags(config, self.fixed)
        name, log = self.new_run_name(key, [suffix for _, _, suffix in self.members(config)])
        command = [sys.executable, self.script, *flags, "--run-name", name]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.time()
        with log:
            with self.lock:  # no new run once a stop has begun
                if self.stopping:
                    raise RuntimeError("the study is stopping")
                proc = subprocess.Popen(
                    command,
                    cwd=os.path.dirname(self.runs_root),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                self.live.add(proc)
            returncode = proc.wait()
            with self.lock:
                self.live.discard(proc)
        records = []
        for member_key, member_config, suffix in self.members(config):
            run_dir = os.path.join(self.runs_root, name + suffix)
            record = dict(
                key=member_key,
                config=member_config,
                status="ok",
                returncode=returncode,
                run_name=name + suffix,
                run_dir=run_dir,
                log=log.name,
                command=shlex.join(["python", os.path.basename(self.script), *command[2:]]),
                wall_time=time.time() - start,
                fixed=self.fixed,
                study_command=self.study_command,
            )
            if returncode == 0:
                try:
                    record["metrics"], record["curve"] = self.summarize(run_dir)
                except Exception as e:  # an exit 0 without readable events is a failed run, not a crashed study
                    record.update(status="failed", error=f"{type(e).__name__}: {e}")
            else:
                record.update(status="failed", error=f"exit code {returncode}")
            if record["status"] == "failed":
                record["log_tail"] = log_tail(log.name)
            records.append(record)
        return records

    def stop(self):
        with self.lock:
            self.stopping = True
            for proc in self.live:
                proc.terminate()


# ---------------------------------------------------------------------------------------------
# runs.jsonl: the study's state, one finished run per line
# ---------------------------------------------------------------------------------------------
def load_records(path):
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                fail(f"{path} line {i} is not a JSON record")
    return records


def write_atomic(path, write):
    """write(tmp), fsync, then rename: a reader or a restart sees the old file or the new one, never a part."""
    tmp = f"{path}.{os.getpid()}.tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def save_records(path, records):
    """The whole file, rewritten atomically after every run (not appended): no torn last line to guard against
    after a crash, and at a few KB per run even a thousand runs rewrite in milliseconds."""
    save_text(path, "".join(json.dumps(r) + "\n" for r in records))


def finished(records):
    """key -> the run's ok record (the last one, should a key have several)."""
    return {r["key"]: r for r in records if r["status"] == "ok"}


def number(value, digits):
    return "–" if value is None else f"{value:.{digits}f}"


def describe(record):
    """The progress line's account of a finished run."""
    m = record["metrics"]
    return (
        f"final return {number(m['final_return'], 3)}, success {number(m['final_success'], 2)} "
        f"({m['final_episodes']} episodes), {number(m['sps'], 0)} SPS"
    )


def run_study(args, configs, runs_path, records, launcher, describe=describe):
    """Launch the configs' unfinished runs, `--jobs` at a time, recording each as it finishes; 1 if any failed. A
    process is rerun unless every one of its members finished."""
    done = finished(records)
    todo = [c for c in configs if any(key not in done for key, _, _ in launcher.members(c))]
    print(
        f"{len(configs)} runs in the grid: {len(configs) - len(todo)} finished earlier (skipped), "
        f"{len(todo)} to run, {args.jobs} at a time; runs in {os.path.abspath(args.work_dir)}/runs",
        flush=True,
    )
    if not todo:
        return 0
    os.makedirs(os.path.join(args.work_dir, "runs"), exist_ok=True)
    failures = 0
    pool = ThreadPoolExecutor(args.jobs)
    previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        futures = [pool.submit(launcher.run, config) for config in todo]
        for i, future in enumerate(as_completed(futures), 1):
            done_records = future.result()
            records.extend(done_records)
            save_records(runs_path, records)  # recorded as it finishes: a stop loses only the runs under way
            for record in done_records:
                if record["status"] == "ok":
                    print(
                        f"[{i}/{len(todo)}] ok {record['run_name']}: {describe(record)}, {record['wall_time']:.0f} s",
                        flush=True,
                    )
                else:
                    failures += 1
                    last = record["log_tail"].strip().splitlines()[-1:] or [""]
                    print(
                        f"[{i}/{len(todo)}] FAILED {record['run_name']} ({record['error']}): {last[0]} (log: {record['log']})",
                        flush=True,
                    )
    finally:  # on a stop (Ctrl-C, SIGTERM) or a crash: start nothing more, end the runs under way
        launcher.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous_sigterm)
    if failures:
        print(f"{failures} runs failed (recorded; they are retried on the next start)")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# The report, recomputed from runs.jsonl: results.json, results.csv, table.md, plots
# ---------------------------------------------------------------------------------------------
METRICS = ("final_return", "final_success", "eval_return", "eval_success", "sps")


def spread(values):
    """mean and sample sd (n - 1) over the finite values; sd is None below two values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return dict(
        mean=statistics.fmean(finite) if finite else None,
        sd=statistics.stdev(finite) if len(finite) > 1 else None,
        n=len(finite),
        values=values,
    )


def sort_value(value):
    """Swept values in numeric order where they are numbers."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def cell_key(config):
    return (config["env_id"], config["core"], config["num_steps"], tuple(config["sets"].items()))


def aggregate(records):
    """One cell per (env, core, unroll, swept values) over its seeds' finished runs."""
    by_cell = {}
    for r in finished(records).values():
        by_cell.setdefault(cell_key(r["config"]), []).append(r)
    env_order = list(dict.fromkeys(r["config"]["env_id"] for r in records))

    def order(k):
        return (
            env_order.index(k[0]),
            CORES.index(k[1]) if k[1] in CORES else len(CORES),
            k[1],
            [(n, sort_value(v)) for n, v in k[3]],
            k[2],
        )

    cells = []
    for key in sorted(by_cell, key=order):
        runs = sorted(by_cell[key], key=lambda r: r["config"]["seed"])
        cell = dict(
            env_id=key[0],
            core=key[1],
            num_steps=key[2],
            sets=dict(key[3]),
            n=len(runs),
            seeds=[r["config"]["seed"] for r in runs],
            keys=[r["key"] for r in runs],
        )
        cell.update({metric: spread([r["metrics"][metric] for r in runs]) for metric in METRICS})
        cells.append(cell)
    return cells


def line_label(cell):
    return ", ".join([cell["core"], *(f"{n}={v}" for n, v in cell["sets"].items())])


def commands_md(commands):
    """A report's lines listing the study commands that made its runs, as a code block."""
    return ["Commands that made these runs:", "", "```", *commands, "```", ""]


def mean_sd(s, digits):
    return number(s["mean"], digits) + (f" ± {s['sd']:.{digits}f}" if s["sd"] is not None else "")


def markdown_table(cells, env_id, return_metric, success_metric):
    cells = [c for c in cells if c["env_id"] == env_id]
    unrolls = sorted({c["num_steps"] for c in cells})
    rows = {}  # line label -> unroll -> "mean ± sd (success mean ± sd) n=seeds [each seed's return]"
    for c in cells:
        seeds = ", ".join("–" if v is None else f"{v:.3g}" for v in c[return_metric]["values"])
        text = f"{mean_sd(c[return_metric], 3)} ({mean_sd(c[success_metric], 2)}) n={c[return_metric]['n']} [{seeds}]"
        rows.setdefault(line_label(c), {})[c["num_steps"]] = text
    lines = ["| core | " + " | ".join(f"--num-steps {u}" for u in unrolls) + " |", "| --- |" + " --- |" * len(unrolls)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(row.get(u, "–") for u in unrolls) + " |")
    return lines


def table_md(results):
    fixed, cells = results["fixed"], results["cells"]
    flags = shlex.join(fixed["extra"]) or "none (the script's defaults)"
    swept = ", ".join(f"`--{name}` {' '.join(values)}" for name, values in results["swept"].items()) or "none"
    lines = [
        "# Unroll-length study",
        "",
        "Written by `experiments/unroll_study.py` from `runs.jsonl`: data only.",
        "",
        f"- script: `{fixed['script']}`, `--total-timesteps {fixed['total_timesteps']}`",
        f"- flags of every run, the same for every core: `{flags}`",
        f"- swept flags: {swept}",
        f"- final return (success rate): mean over the training episodes that finish in the last "
        f"{FINAL_FRACTION:.0%} of the steps; mean ± sample sd over seeds, n = seeds",
        "",
        *commands_md(results["commands"]),
        f"Report command: `{results['report_command']}`",
    ]
    for env_id in dict.fromkeys(c["env_id"] for c in cells):
        lines += ["", f"## {env_id}", "", "Final return (success rate):", ""]
        lines += markdown_table(cells, env_id, "final_return", "final_success")
        if any(c["env_id"] == env_id and c["eval_return"]["n"] for c in cells):
            lines += ["", "Greedy evaluation, return (success rate):", ""]
            lines += markdown_table(cells, env_id, "eval_return", "eval_success")
        lines += ["", f"![curves]({plot_name('curves', env_id)})", "", f"![final]({plot_name('final', env_id)})"]
    done = finished(results["runs"])
    failed = {r["key"]: r for r in results["runs"] if r["key"] not in done}.values()  # the last attempt of each
    if failed:
        lines += ["", "## Failed runs (retried on the next start)", ""]
        lines += [f"- `{r['run_name']}`: {r['error']}; log `{r['log']}`" for r in failed]
    return "\n".join(lines) + "\n"


def results_csv(results):
    """One row per run record, failed ones too (with empty metrics); a column per swept flag."""
    columns = [
        "run_name",
        "status",
        "env_id",
        "core",
        "num_steps",
        "seed",
        *results["swept"],
        "final_return",
        "final_success",
        "final_episodes",
        "episodes",
        "eval_return",
        "eval_success",
        "eval_episodes",
        "sps",
        "wall_time",
        "returncode",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in results["runs"]:
        writer.writerow({**r, **r["config"], **r["config"]["sets"], **r.get("metrics", {})})  # None is written as ""
    return buffer.getvalue()


def plot_name(kind, env_id):
    return f"{kind}_{re.sub(r'[^A-Za-z0-9._-]', '_', env_id)}.png"


def save_figure(fig, path):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def plot_curves(records, cells, env_id, path):
    """One column per unroll, return (top) and success (bottom) against steps, one line per core: the mean over
    seeds of the binned curves, shaded between the seeds' min and max."""
    runs = finished(records)
    cells = [c for c in cells if c["env_id"] == env_id]
    unrolls = sorted({c["num_steps"] for c in cells})
    labels = list(dict.fromkeys(line_label(c) for c in cells))
    colors = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(labels)))
    fig, axes = plt.subplots(2, len(unrolls), figsize=(4 * len(unrolls), 6), squeeze=False, sharex=True)
    for c in cells:
        col = unrolls.index(c["num_steps"])
        curves = [runs[key]["curve"] for key in c["keys"]]
        for row, metric in enumerate(("episodic_return", "success")):
            values = np.array([[np.nan if v is None else v for v in curve[metric]] for curve in curves], dtype=float)
            with warnings.catch_warnings():  # a bin with no episode in any seed is a gap in the line
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
            ax, steps = axes[row, col], curves[0]["step"]
            ax.plot(steps, mean, ".-", markersize=3, color=colors[line_label(c)], label=f"{line_label(c)} (n={c['n']})")
            ax.fill_between(steps, low, high, color=colors[line_label(c)], alpha=0.2, linewidth=0)
    for col, unroll in enumerate(unrolls):
        axes[0, col].set_title(f"{env_id}, --num-steps {unroll}")
        axes[0, col].set_ylabel("episodic return")
        axes[1, col].set_ylabel("success rate")
        axes[1, col].set_xlabel("environment steps")
        axes[0, col].legend(fontsize=7)
    save_figure(fig, path)


def plot_final(cells, env_id, path):
    """Final return and success against the unroll (log x), one line per core: mean ± sd, seeds as points."""
    cells = [c for c in cells if c["env_id"] == env_id]
    labels = list(dict.fromkeys(line_label(c) for c in cells))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in zip(axes, ("final_return", "final_success"), ("final return", "final success rate")):
        for i, label in enumerate(labels):
            line = [c for c in cells if line_label(c) == label and c[metric]["mean"] is not None]
            xs = [c["num_steps"] for c in line]
            color = f"C{i % 10}"
            ax.errorbar(
                xs,
                [c[metric]["mean"] for c in line],
                yerr=[c[metric]["sd"] or 0 for c in line],
                color=color,
                marker="o",
                capsize=3,
                label=label,
            )
            points = [(c["num_steps"], v) for c in line for v in c[metric]["values"] if v is not None]
            if points:
                ax.scatter(*zip(*points), color=color, s=10, alpha=0.5)
        ax.set_xscale("log", base=2)
        unrolls = sorted({c["num_steps"] for c in cells})
        ax.set_xticks(unrolls, [str(u) for u in unrolls])
        ax.minorticks_off()
        ax.set_xlabel("--num-steps (steps per unroll)")
        ax.set_ylabel(f"{name} (last {FINAL_FRACTION:.0%} of steps)")
        ax.set_title(f"{env_id}: mean ± sd over seeds")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def write_report(out_dir, records, fixed, report_command):
    cells, swept = aggregate(records), {}
    for r in records:
        for name, value in r["config"]["sets"].items():
            swept.setdefault(name, set()).add(value)
    swept = {name: sorted(values, key=sort_value) for name, values in swept.items()}
    commands = list(dict.fromkeys(r["study_command"] for r in records))
    results = dict(report_command=report_command, commands=commands, fixed=fixed, swept=swept, cells=cells, runs=records)
    save_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1) + "\n")
    save_text(os.path.join(out_dir, "results.csv"), results_csv(results))
    for env_id in dict.fromkeys(c["env_id"] for c in cells):
        plot_curves(records, cells, env_id, os.path.join(out_dir, plot_name("curves", env_id)))
        plot_final(cells, env_id, os.path.join(out_dir, plot_name("final", env_id)))
    save_text(os.path.join(out_dir, "table.md"), table_md(results))
    print(f"report: {len(cells)} cells from {len(finished(records))} finished runs in {out_dir}")


def study(args, fixed, command, configs, launcher, report, describe=describe):
    """The study's whole course, for this runner and its siblings: the runs recorded in out_dir/runs.jsonl, the
    unfinished ones of `configs` launched (one runner per out dir), then report(records, fixed, command)."""
    runs_path = os.path.join(args.out_dir, "runs.jsonl")
    records = load_records(runs_path)
    if args.report_only:
        if not records:
            fail(f"no runs recorded in {runs_path}")
        report(records, records[-1]["fixed"], command)
        return 0
    other = next((r["fixed"] for r in records if r["fixed"] != fixed), None)
    if other:  # one out dir, one study: never average runs made with other flags into one cell
        fail(f"{runs_path} holds runs with other fixed flags ({other}, now {fixed}); use another --out-dir")
    os.makedirs(args.out_dir, exist_ok=True)
    lock = os.open(args.out_dir, os.O_RDONLY)  # held until exit: one runner per out dir
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another {os.path.basename(sys.argv[0])} is running on {args.out_dir}")
    try:
        status = run_study(args, configs, runs_path, records, launcher, describe)
    except KeyboardInterrupt:
        print(f"stopped: the finished runs are in {runs_path}; the same command resumes", file=sys.stderr)
        status = 130
    if records:
        report(records, fixed, command)
    return status


def main(argv=None):
    args, extra, sets = parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    fixed = dict(script=os.path.basename(args.script), total_timesteps=args.total_timesteps, extra=extra)
    report = lambda records, fixed, command: write_report(args.out_dir, records, fixed, command)
    return study(args, fixed, command, grid(args, sets), Launcher(args, fixed, command), report)


if __name__ == "__main__":
    sys.exit(main())
