"""The POPGym study: rtrl_a2c_popgym.py over POPGym's memory tasks x difficulties x configurations x seeds, scored by
MMER and the mean return of the last 10% of training, beside POPGym's and RTRRL's published numbers.

The runner is unroll_study.py's and the population handling memory_study.py's (one process per configuration and
task, training each run of consecutive seeds together; resumable: runs.jsonl records each finished run and a
restart skips it; `--report-only` launches nothing). A configuration is CORE:UNROLL[:FLAG=VALUE...], where UNROLL
may be `episode`: the task's longest episode plus its terminal step, so that with every environment starting
together each rollout of a fixed-length task is one whole episode (POPGym's protocol backpropagates whole episodes).

    python experiments/popgym_study.py --tasks RepeatFirst --difficulties Easy --configs rtrl:4 lstm:4 \\
        --set learning-rate=3e-4,1e-3,3e-3 --out-dir docs/popgym_study/sweep                    # the sweep
    python experiments/popgym_study.py                  # the study: 6 tasks x 3 difficulties x 5 configurations
    python experiments/popgym_study.py --quick          # a smoke run of a minute (CI)
"""

import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_study  # noqa: E402 (populations and run keys: the same processes as the bsuite study's)
import unroll_study as runner  # noqa: E402 (the resumable runner every study shares)
from unroll_study import ROOT, fail, finished, plt, save_figure, save_text, spread  # noqa: E402

TASKS = ("RepeatFirst", "RepeatPrevious", "CountRecall", "Autoencode", "PositionOnlyCartPole", "NoisyPositionOnlyCartPole")
DIFFICULTIES = ("Easy", "Medium", "Hard")
# the longest episode of each task (popgym 1.0.7; SPEC §9), plus the step on its terminal observation
EPISODE = {
    "RepeatFirst": (51, 415, 831),
    "RepeatPrevious": (51, 103, 155),
    "CountRecall": (51, 103, 207),
    "Autoencode": (103, 207, 311),
    "PositionOnlyCartPole": (200, 400, 600),
    "NoisyPositionOnlyCartPole": (200, 200, 200),
}
CURVE_BINS = 20  # the recorded learning curve: mean episodic return in 20 equal bins of steps
DEFAULTS = dict(
    tasks=TASKS,
    difficulties=DIFFICULTIES,
    configs=("rtrl:4", "tbptt:4", "lstm:4", "lstm:episode", "ff:4"),
    seeds=(1, 2, 3),
    extra="--total-timesteps 1000000",
)
QUICK = dict(
    tasks=("RepeatPrevious",),
    difficulties=("Easy",),
    configs=("rtrl:4", "lstm:episode"),
    seeds=(1, 2),
    extra="--total-timesteps 3328 --num-envs 4 --hidden-size 8 --mmer-window 4",
)


@dataclass
class Args(memory_study.RunnerArgs):
    tasks: tuple[str, ...] | None = None
    """POPGym tasks (default: the six memory tasks; --quick: RepeatPrevious)"""
    difficulties: tuple[str, ...] | None = None
    """Easy, Medium, Hard (default: all three; --quick: Easy)"""
    configs: tuple[str, ...] | None = None
    """configurations CORE:UNROLL[:FLAG=VALUE...], UNROLL a number or `episode` (default: rtrl:4 tbptt:4 lstm:4
    lstm:episode ff:4; --quick: rtrl:4 lstm:episode)"""
    seeds: tuple[int, ...] | None = None
    """--seed values (default: 1 2 3; --quick: 1 2); one process trains each run of consecutive seeds together"""
    extra: str | None = None
    """further flags of every run (default: "--total-timesteps 1000000"; with --quick, added to its flags and
    winning over them)"""
    script: str = os.path.join(ROOT, "rtrl_a2c_popgym.py")
    """the training script"""


def parse_config(spec):
    """'lstm:episode' -> ('lstm', 'episode', {}); otherwise memory_study's CORE:UNROLL[:FLAG=VALUE...]."""
    core, unroll, flags = memory_study.parse_config(re.sub(r"^(\w+):episode\b", r"\1:1", spec))
    return core, "episode" if spec.split(":")[1:2] == ["episode"] else unroll, flags


def parse_args(argv=None):
    args, extra = runner.read_flags(Args, argv, DEFAULTS, QUICK)
    unknown = [t for t in args.tasks if t not in TASKS] + [d for d in args.difficulties if d not in DIFFICULTIES]
    if unknown or not args.tasks or not args.difficulties or not args.configs or not args.seeds or args.jobs < 1:
        fail(f"--tasks in {', '.join(TASKS)}, --difficulties in {', '.join(DIFFICULTIES)}, each non-empty, got {unknown}")
    return memory_study.checked(args, extra, parse_config, "popgym_study", "--tasks, --difficulties, --configs, --seeds")


def grid(args, configs, sets):
    """Every process: its seeds outermost, then difficulty (Easy first), task, and configuration: a study stopped early
    has every configuration of its first tasks."""
    swept = [dict(zip(sets, values)) for values in itertools.product(*sets.values())]
    tasks = [(task, level) for level in DIFFICULTIES if level in args.difficulties for task in args.tasks]
    return [
        dict(env_id=f"popgym-{task}{level}-v0", task=task, difficulty=level, core=core, num_steps=unroll, seeds=seeds)
        | dict(sets={**flags, **combo})
        for seeds, combo, (task, level), (core, unroll, flags) in itertools.product(
            memory_study.populations(args.seeds), swept, tasks, configs
        )
    ]


def episode_length(task, difficulty):
    return EPISODE[task][DIFFICULTIES.index(difficulty)]


def script_flags(config, fixed):
    """memory_study's, with an `episode` unroll made the task's longest episode and its terminal step."""
    unroll = (
        episode_length(config["task"], config["difficulty"]) + 1 if config["num_steps"] == "episode" else config["num_steps"]
    )
    return memory_study.script_flags({**config, "num_steps": unroll}, fixed)


def summarize(run_dir):
    """MMER and the last 10%'s mean return as the run logged them, the critic's largest |V|, its SPS, and the mean
    return in bins of steps."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "popgym/mmer" not in acc.Tags()["scalars"]:
        raise ValueError(f"no popgym/mmer event in {run_dir}")
    value = lambda tag: acc.Scalars(tag)[-1].value
    returns = acc.Scalars("charts/episodic_return")
    total = acc.Scalars("popgym/mmer")[-1].step
    bins = [[e.value for e in returns if i * total < e.step * CURVE_BINS <= (i + 1) * total] for i in range(CURVE_BINS)]
    value_max = [e.value for e in acc.Scalars("losses/value_max")] if "losses/value_max" in acc.Tags()["scalars"] else []
    metrics = dict(
        mmer=value("popgym/mmer"),
        value_max=max(value_max, default=None),  # the largest |V| the critic gave over training
        final_return=value("popgym/final_return"),
        episodes=len(returns),
        steps=total,
        sps=float(np.mean([e.value for e in acc.Scalars("charts/SPS")])),
    )
    return metrics, dict(returns=[float(np.mean(b)) if b else None for b in bins])


def describe(record):
    m = record["metrics"]
    return f"MMER {m['mmer']:.3f}, last 10% {m['final_return']:.3f}, {m['episodes']} episodes, {m['sps']:.0f} SPS"


# ---------------------------------------------------------------------------------------------
# The report, recomputed from runs.jsonl: results.json, table.md, popgym.png
# ---------------------------------------------------------------------------------------------
# POPGym's MMER (Morad et al., ICLR 2023; 3 trials of 15M steps, whole episodes backpropagated): task -> difficulty ->
# (GRU, LSTM, (best model, its MMER)). Empty: the appendix tables could not be read from a primary source here
# (docs/popgym_study/published.md says what was tried); a cell is filled only from the paper itself, never from memory.
PUBLISHED = {}


def aggregate(records):
    """One cell per (task, difficulty, configuration) over its seeds' finished runs."""
    cells = {}
    for r in finished(records).values():
        c = r["config"]
        cells.setdefault((c["task"], c["difficulty"], memory_study.label(c)), []).append(r)
    out = []
    for (task, level, name), runs in cells.items():
        runs = sorted(runs, key=lambda r: r["config"]["seed"])
        metrics = {
            m: spread([r["metrics"].get(m) for r in runs]) for m in ("mmer", "final_return", "value_max", "sps", "steps")
        }
        out.append(dict(task=task, difficulty=level, config=name, seeds=[r["config"]["seed"] for r in runs], **metrics))
    order = lambda c: (TASKS.index(c["task"]), DIFFICULTIES.index(c["difficulty"]))
    return sorted(out, key=order)


def table_md(results):
    cells, configs = results["cells"], results["configs"]
    lines = [
        "# POPGym's memory tasks",
        "",
        "Written by `experiments/popgym_study.py` from `runs.jsonl`: data only.",
        "",
        f"- script: `{results['fixed']['script']}`, flags of every run: `{shlex.join(results['fixed']['extra']) or 'none'}`",
        "- a cell: MMER (the best mean return of --mmer-window consecutive episodes over training, 100 by default), "
        "mean ± sd over seeds, and in brackets the mean return of the episodes of the last 10% of training (mean over "
        "seeds); returns lie in [-1, 1]",
        "- POPGym's published MMER: see published.md (unverified: not read from a primary source here)",
        "",
        *runner.commands_md(results["commands"]),
    ]
    head = ["task", *(f"`{c}`" for c in configs), "POPGym GRU", "POPGym LSTM", "POPGym best"]
    lines += ["| " + " | ".join(head) + " |", "| --- |" + " --- |" * (len(head) - 1)]
    for task, level in dict.fromkeys((c["task"], c["difficulty"]) for c in cells):
        row = [f"{task}{level}"]
        for name in configs:
            c = next((c for c in cells if (c["task"], c["difficulty"], c["config"]) == (task, level, name)), None)
            row.append("–" if c is None else f"{runner.mean_sd(c['mmer'], 2)} ({runner.number(c['final_return']['mean'], 2)})")
        gru, lstm, best = PUBLISHED.get(task, {}).get(level, (None, None, None))
        show = lambda v: "unverified" if v is None else f"{v:.2f}"
        row += [show(gru), show(lstm), f"{best[1]:.2f} ({best[0]})" if best else "unverified"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + ["", "![MMER](popgym.png)"]) + "\n"


def plot(results, path):
    """One panel per task: each difficulty's MMER per configuration (bars: mean, points: seeds), POPGym's GRU a dash."""
    cells, configs = results["cells"], results["configs"]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.6), squeeze=False)
    width = 0.8 / len(configs)
    for ax, task in zip(axes[0], tasks):
        for i, level in enumerate(DIFFICULTIES):
            for k, name in enumerate(configs):
                c = next((c for c in cells if (c["task"], c["difficulty"], c["config"]) == (task, level, name)), None)
                if c is not None and c["mmer"]["n"]:
                    x = i - 0.4 + width * (k + 0.5)
                    ax.bar(
                        x, c["mmer"]["mean"] + 1, width, bottom=-1, color=f"C{k}", alpha=0.7, label=name if i == 0 else None
                    )
                    ax.scatter([x] * c["mmer"]["n"], c["mmer"]["values"], color="black", s=6, zorder=3)
            gru = PUBLISHED.get(task, {}).get(level, (None,))[0]
            if gru is not None:
                ax.hlines(gru, i - 0.45, i + 0.45, color="black", linestyle=":", label="POPGym GRU" if i == 0 else None)
        ax.set_xticks(range(3), DIFFICULTIES)
        ax.set_ylim(-1, 1)
        ax.set_title(task, fontsize=9)
    axes[0][0].set_ylabel("MMER")
    # every configuration, also those run on some tasks only
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[0][0].legend(legend.values(), legend.keys(), fontsize=6)
    save_figure(fig, path)


def write_report(out_dir, records, fixed, report_command):
    cells = aggregate(records)
    configs = list(dict.fromkeys(memory_study.label(r["config"]) for r in records))
    commands = list(dict.fromkeys(r["study_command"] for r in records))
    results = dict(cells=cells, configs=configs, fixed=fixed, commands=commands, report_command=report_command)
    save_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1) + "\n")
    save_text(os.path.join(out_dir, "table.md"), table_md(results))
    if cells:
        plot(results, os.path.join(out_dir, "popgym.png"))
    print(f"report: {len(finished(records))} finished runs in {out_dir}")


def main(argv=None):
    args, extra, configs, sets = parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    fixed = dict(script=os.path.basename(args.script), extra=extra)
    launcher = runner.Launcher(args, fixed, command, memory_study.run_key, script_flags, summarize, memory_study.members)
    report = lambda records, fixed, command: write_report(args.out_dir, records, fixed, command)
    return runner.study(args, fixed, command, grid(args, configs, sets), launcher, report, describe)


if __name__ == "__main__":
    sys.exit(main())
