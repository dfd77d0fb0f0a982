"""The critic's and the policy's course per run of a POPGym study (docs/popgym_study/critic.md, bias1.md): from each
run's TensorBoard log, the largest |V| (`losses/value_max`) in the first 10%, 10-50% and last 50% of its updates, and
the lowest entropy of the first half over its first. Needs the runs' directories (the runner's --work-dir).

    python experiments/popgym_critic.py docs/popgym_study/bias1/runs.jsonl --difficulty Easy
"""

import json
import os
import sys
from dataclasses import dataclass

import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """runs.jsonl files of the studies"""
    difficulty: str = "Easy"
    """the difficulty whose runs to read"""


def course(run_dir):
    """(max |V| in the first 10%, 10-50%, last 50% of the updates, lowest entropy of the first half / the first);
    |V| is nan for runs that predate losses/value_max."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    entropy = [e.value for e in acc.Scalars("losses/entropy")]
    n = len(entropy)
    values = [e.value for e in acc.Scalars("losses/value_max")] if "losses/value_max" in acc.Tags()["scalars"] else []
    parts = [values[: max(n // 10, 1)], values[n // 10 : n // 2], values[n // 2 :]]
    return [max(p) if p else float("nan") for p in parts] + [min(entropy[: max(n // 2, 1)]) / entropy[0]]


def error(message):
    print(f"popgym_critic.py: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    args = tyro.cli(Args)
    missing = [path for path in args.runs if not os.path.isfile(path)]
    if missing:
        error(f"{missing[0]}: no such file")
    records = [json.loads(line) for path in args.runs for line in open(path)]
    records = [r for r in records if r["config"]["difficulty"] == args.difficulty and r["status"] == "ok"]
    gone = [r["run_dir"] for r in records if not os.path.isdir(r["run_dir"])]
    if gone:
        error(f"{gone[0]}: no such run directory (its runs' TensorBoard logs are in the runner's --work-dir)")
    print("| task | configuration | seed | max abs(V), first 10% | 10-50% | last 50% | lowest entropy / first | MMER |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        c = r["config"]
        name = ":".join([c["core"], str(c["num_steps"])] + [f"{k}={v}" for k, v in c["sets"].items()])
        cells = " | ".join(f"{x:.3f}" if i == 3 else f"{x:.1f}" for i, x in enumerate(course(r["run_dir"])))
        print(f"| {c['task']} | {name} | {c['seed']} | {cells} | {r['metrics']['mmer']:.2f} |")
