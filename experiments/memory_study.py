"""The memory-length study: rtrl_a2c_bsuite.py over bsuite's memory_len settings x configurations x seeds, scored by
bsuite's own analysis, collected into a report.

Each run is one bsuite id (10,000 episodes by default) and ends by printing and logging bsuite's result for it; a
configuration's bsuite score is the fraction of the settings it learned, per seed. One process trains every seed of a
configuration and setting together (`--num-seeds`, a population; one per run of consecutive seeds), each seed into its
own run directory and record; a process stopped before all its seeds finished runs again whole. The runner is unroll_study.py's
(resumable: runs.jsonl records each finished run and a restart skips it; `--report-only` launches nothing), with the
grid, the metrics and the report of this study. Hyperparameters are the same for every configuration: pick them with
a sweep on one middle length (`--set`), then pass them to the study with `--extra`.

    python experiments/memory_study.py --settings 15 --configs rtrl:4 lstm:32 --seeds 1 \\
        --set forget-bias=0,1,3 --set learning-rate=1e-3,3e-3 --out-dir docs/memory_study/sweep   # the sweep
    python experiments/memory_study.py                  # the study: 23 lengths x 6 configurations x 3 seeds
    python experiments/memory_study.py --configs rtrl:4:stem=mlp --settings 3 5 9 13      # the stem ablation
    python experiments/memory_study.py --quick          # a smoke run of a minute (CI)
"""

import csv
import io
import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, replace
from typing import Annotated

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import unroll_study as runner  # noqa: E402 (the resumable runner this study shares)
from unroll_study import ROOT, fail, finished, parse_sets, plt, save_figure, save_text, spread  # noqa: E402

NUM_EPISODES = 10_000  # bsuite's sweep.NUM_EPISODES: the episodes it scores
LEARNED_RIGHT = 0.625  # bsuite's threshold, regret ratio < 0.75, as a fraction of right answers: 1 - 0.75 / 2
PUBLISHED = {"memory_len": 0.65, "memory_size": 0.35}  # actor_critic_rnn (LSTM 256, TBPTT 32), bsuite's report
LENGTHS = {
    "memory_len": (*range(1, 11), 12, 14, 17, 20, 25, *range(30, 105, 10)),  # bsuite's memory_len sweep.SETTINGS
    "memory_size": (*range(1, 11), 12, 14, 17, 20, 25, 30, 40),  # memory_size's: bits
}
GRID_FLAGS = ("--env-id", "--core", "--num-steps", "--seed", "--num-seeds", "--run-name")  # set by the runner
CURVE_BINS = 20  # the recorded learning curve: fraction right in 20 bins of 500 episodes
DEFAULTS = dict(
    settings=None,  # all of the experiment's
    configs=("rtrl:4", "tbptt:4", "lstm:4", "lstm:32", "ff:4", "rtrl:1"),
    seeds=tuple(range(1, 11)),
    extra="",
)
QUICK = dict(settings=(0, 3), configs=("rtrl:4", "tbptt:4"), seeds=(1,), extra="--num-episodes 48 --hidden-size 8")


@dataclass
class RunnerArgs:
    """The flags of every study on the runner (this one's and experiments/popgym_study.py's)."""

    set: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """a swept axis of a script flag, NAME=V1,V2,..., e.g. --set forget-bias=0,1,3; one --set per axis"""
    jobs: int = 2
    """runs at a time"""
    out_dir: str | None = None
    """where runs.jsonl and the report go (default: docs/<the study's name>; --quick: a new temp dir)"""
    work_dir: str | None = None
    """where the runs' runs/NAME directories and logs go (default: experiments/work; --quick: a new temp dir)"""
    quick: bool = False
    """a tiny grid for a smoke test; flags you pass still win"""
    report_only: bool = False
    """launch nothing: rewrite the report from out_dir/runs.jsonl"""


@dataclass
class Args(RunnerArgs):
    experiment: str = "memory_len"
    """bsuite's experiment: memory_len (settings 0-22, lengths 1-100) or memory_size (0-16, bits 1-40)"""
    settings: tuple[int, ...] | None = None
    """the experiment's settings (bsuite id memory_len/<i>) (default: all; --quick: 0 3)"""
    configs: tuple[str, ...] | None = None
    """configurations CORE:UNROLL[:FLAG=VALUE...], e.g. rtrl:4 lstm:32 rtrl:4:stem=mlp (default: rtrl:4 tbptt:4
    lstm:4 lstm:32 ff:4 rtrl:1; --quick: rtrl:4 tbptt:4)"""
    seeds: tuple[int, ...] | None = None
    """--seed values (default: 1-10; --quick: 1); one process trains each run of consecutive seeds together"""
    extra: str | None = None
    """further flags of every run, e.g. "--forget-bias 3" (with --quick, added to its flags and winning over them)"""
    script: str = os.path.join(ROOT, "rtrl_a2c_bsuite.py")
    """the training script"""


def parse_config(spec):
    """'rtrl:4:stem=mlp' -> ('rtrl', 4, {'stem': 'mlp'})."""
    core, _, rest = spec.partition(":")
    unroll, _, flags = rest.partition(":")
    pairs = [p.partition("=") for p in flags.split(":")] if flags else []
    if core not in runner.CORES or not unroll.isdigit() or int(unroll) < 1 or any(not eq or not v for _, eq, v in pairs):
        fail(f"--configs wants CORE:UNROLL[:FLAG=VALUE...] with CORE one of {', '.join(runner.CORES)}, got {spec!r}")
    return core, int(unroll), {name: value for name, _, value in pairs}


def parse_args(argv=None):
    args, extra = runner.read_flags(Args, argv, DEFAULTS, QUICK)
    if args.experiment not in LENGTHS:
        fail(f"--experiment must be one of {', '.join(LENGTHS)}, got {args.experiment!r}")
    if args.settings is None:
        args = replace(args, settings=tuple(range(len(LENGTHS[args.experiment]))))
    bad = [i for i in args.settings if not 0 <= i < len(LENGTHS[args.experiment])]
    if bad or not args.settings or not args.configs or not args.seeds or args.jobs < 1:
        fail(f"--settings in 0-{len(LENGTHS[args.experiment]) - 1}, --configs, --seeds non-empty and --jobs >= 1")
    return checked(args, extra, parse_config, "memory_study", "--settings, --configs, --seeds")


def checked(args, extra, parse, name, grid_hint):
    """The end of a study's parse_args: (args, the flags of every run, the configurations, the swept axes), with the
    grid's own flags refused in --extra and --set, and the study's directories placed."""
    configs = [parse(spec) for spec in args.configs]
    sets = parse_sets(args.set)
    for flag in [*extra, *(f"--{name}" for name in sets)]:
        if flag in GRID_FLAGS:
            fail(f"{flag} is set by the runner (use {grid_hint})")
    runner.place(args, name)
    return args, [token for flag, values in extra.items() for token in (flag, *values)], configs, sets


def populations(seeds):
    """(1, 2, 3, 7) -> [[1, 2, 3], [7]]: the runs of consecutive seeds, one process each (--seed, --num-seeds)."""
    runs = []
    for seed in sorted(set(seeds)):
        if runs and seed == runs[-1][-1] + 1:
            runs[-1].append(seed)
        else:
            runs.append([seed])
    return runs


def grid(args, configs, sets):
    """Every process: its seeds outermost (a study stopped early has whole sweeps for its first seeds), then
    configuration, then the longest settings first (the two jobs end together)."""
    swept = [dict(zip(sets, values)) for values in itertools.product(*sets.values())]
    return [
        dict(env_id=f"{args.experiment}/{i}", setting=i, core=core, num_steps=unroll, seeds=seeds, sets={**flags, **combo})
        for seeds, (core, unroll, flags), combo, i in itertools.product(
            populations(args.seeds), configs, swept, sorted(args.settings, reverse=True)
        )
    ]


def members(job):
    """A process's seeds as runs of their own: (key, config, run directory suffix: the script's __s<seed> for K > 1)."""
    single = lambda seed: {**{k: v for k, v in job.items() if k != "seeds"}, "seed": seed}
    suffix = lambda seed: f"__s{seed}" if len(job["seeds"]) > 1 else ""
    return [(run_key(single(seed)), single(seed), suffix(seed)) for seed in job["seeds"]]


def label(config):
    return ":".join([config["core"], str(config["num_steps"]), *(f"{n}={v}" for n, v in config["sets"].items())])


def run_key(config):
    """A run's name, or a process's: its seed, or its seeds' range."""
    seeds = config.get("seeds", [config.get("seed")])
    name = f"{config['env_id']}__{label(config)}__s{seeds[0]}" + (f"-{seeds[-1]}" if len(seeds) > 1 else "")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def script_flags(config, fixed):
    flags = ["--env-id", config["env_id"], "--core", config["core"], "--num-steps", str(config["num_steps"])]
    flags += ["--seed", str(config["seeds"][0]), "--num-seeds", str(len(config["seeds"])), *fixed["extra"]]
    return flags + [token for name, value in config["sets"].items() for token in (f"--{name}", value)]


def summarize(run_dir):
    """bsuite's result as the run logged it, its SPS, and the fraction right in bins of episodes."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "bsuite/learned" not in tags:
        raise ValueError(f"no bsuite/learned event in {run_dir}")
    value = lambda tag: acc.Scalars(tag)[-1].value
    success = np.array([e.value for e in acc.Scalars("charts/success")][:NUM_EPISODES])
    metrics = dict(
        wrong_fraction=value("bsuite/wrong_fraction"),
        regret_ratio=value("bsuite/regret_ratio"),
        learned=bool(value("bsuite/learned")),
        episodes=len(success),
        sps=float(np.mean([e.value for e in acc.Scalars("charts/SPS")])),
    )
    bins = np.array_split(success, CURVE_BINS)
    return metrics, dict(right=[float(b.mean()) if len(b) else None for b in bins])


def describe(record):
    m = record["metrics"]
    return (
        f"{m['wrong_fraction']:.3f} wrong of {m['episodes']} episodes, {'learned' if m['learned'] else 'not learned'}, "
        f"{m['sps']:.0f} SPS"
    )


# ---------------------------------------------------------------------------------------------
# The report, recomputed from runs.jsonl: results.json, results.csv, table.md, memory.png
# ---------------------------------------------------------------------------------------------
def bootstrap_ci(values, resamples=10_000, seed=0):
    """The 95% percentile bootstrap interval of the mean over seeds, or None below two seeds."""
    if len(values) < 2:
        return None
    means = np.random.default_rng(seed).choice(values, size=(resamples, len(values))).mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def aggregate(records, experiment):
    """Per configuration: each length's fraction right over seeds, and the bsuite score of each seed whose sweep
    over the study's settings is complete."""
    runs = [r for r in finished(records).values() if r["config"]["env_id"].startswith(experiment + "/")]
    settings = sorted({r["config"]["setting"] for r in runs})
    rows = []
    for name in dict.fromkeys(label(r["config"]) for r in runs):
        mine = [r for r in runs if label(r["config"]) == name]
        lengths = {}
        for i in settings:
            cell = sorted((r for r in mine if r["config"]["setting"] == i), key=lambda r: r["config"]["seed"])
            if cell:
                lengths[LENGTHS[experiment][i]] = dict(
                    right=spread([1 - r["metrics"]["wrong_fraction"] for r in cell]),
                    learned=sum(r["metrics"]["learned"] for r in cell),
                    seeds=[r["config"]["seed"] for r in cell],
                )
        scores = {}
        for seed in sorted({r["config"]["seed"] for r in mine}):
            sweep = [r for r in mine if r["config"]["seed"] == seed]
            if len(sweep) == len(settings):  # bsuite's score: the fraction of settings learned
                scores[seed] = float(np.mean([r["metrics"]["learned"] for r in sweep]))
        score = spread(list(scores.values()))
        rows.append(
            dict(config=name, lengths=lengths, scores=scores, score=score, score_ci=bootstrap_ci(list(scores.values())))
        )
    return settings, rows


def table_md(results):
    experiment, rows = results["experiment"], results["rows"]
    lengths = [LENGTHS[experiment][i] for i in results["settings"]]
    unit = "memory length" if experiment == "memory_len" else "bits"
    lines = [
        f"# bsuite {experiment}",
        "",
        "Written by `experiments/memory_study.py` from `runs.jsonl`: data only.",
        "",
        f"- script: `{results['fixed']['script']}`, flags of every run: `{shlex.join(results['fixed']['extra']) or 'none'}`",
        f"- a cell: the fraction of right answers over bsuite's first {NUM_EPISODES:,} episodes, mean ± sd over seeds, "
        f"and how many seeds learned the setting (bsuite: right > {LEARNED_RIGHT}, regret ratio < 0.75)",
        f"- score: bsuite's, the fraction of the {len(lengths)} settings learned, mean ± sd over the seeds with every "
        f"setting run, and its 95% bootstrap interval [low, high]; "
        f"bsuite's published actor_critic_rnn: {PUBLISHED[experiment]}",
        f"- columns: the {unit}",
        "",
        *runner.commands_md(results["commands"]),
    ]
    head = ["configuration", "score"] + [str(length) for length in lengths]
    lines += ["| " + " | ".join(head) + " |", "| --- |" + " --- |" * (len(head) - 1)]
    for r in rows:
        ci = r.get("score_ci")
        interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        cells = [f"`{r['config']}`", f"**{runner.mean_sd(r['score'], 2)}**{interval} (n={r['score']['n']})"]
        for length in lengths:
            c = r["lengths"].get(str(length), r["lengths"].get(length))
            cells.append("–" if c is None else f"{runner.mean_sd(c['right'], 2)} ({c['learned']}/{c['right']['n']})")
        lines.append("| " + " | ".join(cells) + " |")
    if len(lengths) > 1:
        lines += ["", f"![{experiment}](memory_{experiment}.png)"]
    return "\n".join(lines) + "\n"


def results_csv(records):
    columns = ["run_name", "status", "env_id", "setting", "core", "num_steps", "seed", "flags"]
    columns += ["wrong_fraction", "regret_ratio", "learned", "episodes", "sps", "wall_time"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        flags = " ".join(f"--{n} {v}" for n, v in r["config"]["sets"].items())
        writer.writerow({**r, **r["config"], "flags": flags, **r.get("metrics", {})})
    return buffer.getvalue()


def plot(results, path):
    """Left: fraction right against the length (log x), one line per configuration (variants dashed), mean over
    seeds with the seeds' range shaded, bsuite's threshold dashed. Right: each configuration's bsuite score, seeds as
    points, against the published actor_critic_rnn."""
    experiment, rows = results["experiment"], results["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw=dict(width_ratios=(2, 1)))
    for k, r in enumerate(rows):
        points = sorted((int(length), c) for length, c in r["lengths"].items())
        xs = [x for x, _ in points]
        values = [c["right"]["values"] for _, c in points]
        style = "o--" if r["config"].count(":") > 1 else "o-"  # dashed: a variant, one flag set apart
        ax.plot(xs, [np.mean(v) for v in values], style, color=f"C{k % 10}", markersize=3, label=r["config"])
        ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=f"C{k % 10}", alpha=0.15)
        seeds, ci = list(r["scores"].values()), r.get("score_ci")
        if seeds:  # a configuration run on some settings only has no score
            error = [[np.mean(seeds) - ci[0]], [ci[1] - np.mean(seeds)]] if ci else None
            bx.bar(k, np.mean(seeds), yerr=error, capsize=4, color=f"C{k % 10}", alpha=0.7)
            bx.scatter([k] * len(seeds), seeds, color="black", s=10, zorder=3)
        else:
            bx.text(k, 0.02, "some\nlengths\nonly", ha="center", fontsize=7)
    ax.axhline(LEARNED_RIGHT, color="gray", linestyle="--", linewidth=1, label="bsuite: learned above")
    ax.set_xscale("log")
    ax.set_xlabel("memory length" if experiment == "memory_len" else "bits")
    ax.set_ylabel(f"fraction right, first {NUM_EPISODES:,} episodes")
    ax.set_title(f"bsuite {experiment}: mean over seeds (range shaded)")
    ax.legend(fontsize=7)
    bx.axhline(PUBLISHED[experiment], color="black", linestyle=":", label="actor_critic_rnn (bsuite report)")
    bx.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=30, ha="right", fontsize=8)
    bx.set_ylim(0, 1)
    bx.set_ylabel("bsuite score (fraction of settings learned)")
    bx.set_title("score: mean, 95% bootstrap interval, seeds")
    bx.legend(fontsize=7)
    save_figure(fig, path)


def write_report(out_dir, records, fixed, report_command):
    experiments = list(dict.fromkeys(r["config"]["env_id"].split("/")[0] for r in finished(records).values()))
    commands = list(dict.fromkeys(r["study_command"] for r in records))
    for experiment in experiments:
        settings, rows = aggregate(records, experiment)
        results = dict(experiment=experiment, settings=settings, rows=rows, fixed=fixed, commands=commands)
        results["report_command"] = report_command
        suffix = "" if experiment == "memory_len" else f"_{experiment}"
        save_text(os.path.join(out_dir, f"results{suffix}.json"), json.dumps(results, indent=1) + "\n")
        save_text(os.path.join(out_dir, f"table{suffix}.md"), table_md(results))
        if len(settings) > 1:
            plot(results, os.path.join(out_dir, f"memory_{experiment}.png"))
    save_text(os.path.join(out_dir, "results.csv"), results_csv(records))
    print(f"report: {len(finished(records))} finished runs in {out_dir}")


def main(argv=None):
    args, extra, configs, sets = parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    fixed = dict(script=os.path.basename(args.script), extra=extra)
    launcher = runner.Launcher(args, fixed, command, run_key, script_flags, summarize, members)
    report = lambda records, fixed, command: write_report(args.out_dir, records, fixed, command)
    return runner.study(args, fixed, command, grid(args, configs, sets), launcher, report, describe)


if __name__ == "__main__":
    sys.exit(main())
