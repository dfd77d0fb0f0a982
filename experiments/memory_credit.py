"""How much credit the eLSTM can pass from the context to the query in bsuite's MemoryChain: the diagnostic behind
"where RTRL stops" in the memory-length study.

Any exact gradient (RTRL's or BPTT's) of the answer with respect to what the cell stored at the context step is
scaled, per unit, by the product of the cell's diagonal Jacobians over the steps in between (Method §2):
credit_n = prod_{t=2..L} J_t[n], J_t = f_t + alpha_t v_z + beta_t v_f. This script plays episodes with an agent's
own policy and reports that product's distribution over units and episodes: for fresh agents at several forget-gate
biases (what learning starts from), and for the trained agents the study saved (`--save-model`), at their length.

    python experiments/memory_credit.py                                  # into docs/memory_study/credit.md
    python experiments/memory_credit.py --models 'experiments/work/runs/memory_len_*__rtrl_4__s2/model.pt'
"""

import glob
import json
import os
import sys
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rtrl_a2c_bsuite as bs  # noqa: E402 (the agent and environments under study)


@dataclass
class Args:
    lengths: tuple[int, ...] = (10, 20, 30, 50, 70, 100)
    """memory lengths for the fresh agents (bsuite memory_len settings)"""
    forget_biases: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    """--forget-bias values of the fresh agents"""
    models: tuple[str, ...] = (
        "experiments/work/runs/memory_len_*__rtrl_4__s1/model.pt",
        "experiments/work/runs/memory_len_2[02]__rtrl_4_forget-bias=4__s1/model.pt",
        "experiments/work/runs/memory_len_*__rtrl_4_stem=mlp__s1/model.pt",
    )
    """globs of trained agents' model.pt (saved by the study's runs, measured at their own length)"""
    episodes: int = 64
    """episodes per measurement, played in parallel"""
    hidden_size: int = 128
    """N of the fresh agents"""
    out: str = os.path.join(ROOT, "docs", "memory_study", "credit")
    """the report's path without extension: .md and .json are written"""


def env_id_of(length):
    ids = [k for k, v in bs.sweep.SETTINGS.items() if k.startswith("memory_len/") and v["memory_length"] == length]
    if not ids:
        bs.fail(f"{length} is not one of bsuite's memory lengths")
    return ids[0]


@torch.no_grad()
def credit(agent, length, episodes, seed=0):
    """log10 of prod_{t=2..L} |J_t| per episode and unit, over one episode of every env, acting by the agent's policy."""
    envs = bs.Envs(env_id_of(length), bs.env_seeds(seed, episodes), torch.device("cpu"))
    c, _ = agent.cell.initial_state(episodes)
    xs = []
    for _ in range(length + 1):  # the reset observation, the second context one, ..., the query one
        x = agent.features(envs.obs, envs.last_reward)
        xs.append(x)
        action, _, c = agent.act(x, c, envs.first)
        envs.step(action)
    x = torch.stack(xs)
    done = torch.zeros(x.shape[:2], dtype=torch.bool)
    c_all, c_prev, z, f, _ = agent.cell.scan(x, agent.cell.initial_state(episodes)[0], done)
    cell = agent.cell
    alpha, beta = (1 - f) * (1 - z**2), (c_prev - z) * f * (1 - f)
    J = f + alpha * cell.v_z + beta * cell.v_f  # dc_t / dc_{t-1}, Method §2
    return J[2:].abs().clamp_min(1e-30).log10().sum(0)  # from c_1 (the last step showing the context) to c_L


def summary(log_credit):
    """Median over units and episodes, the best unit's (max over units, median over episodes), and the fraction of
    units whose credit exceeds 0.1."""
    values = log_credit.flatten()
    return dict(
        median=float(values.median()),
        best_unit=float(log_credit.max(1).values.median()),
        above_0_1=float((values > -1).double().mean()),
    )


def main(argv=None):
    args = tyro.cli(Args, args=argv)
    torch.manual_seed(0)
    fresh = {}
    for bias in args.forget_biases:
        agent = bs.Agent((3,), 2, args.hidden_size, "rtrl", "none", bias)
        fresh[bias] = {length: summary(credit(agent, length, args.episodes)) for length in args.lengths}
    trained = []
    for path in sorted({path for pattern in args.models for path in glob.glob(pattern)}):
        saved = torch.load(path, weights_only=True)
        a = saved["args"]
        agent = bs.Agent((3,), 2, a["hidden_size"], a["core"], a["stem"])
        agent.load_state_dict(saved["model"])
        length = bs.sweep.SETTINGS[a["env_id"]]["memory_length"]
        run = os.path.basename(os.path.dirname(path))
        trained.append(dict(run=run, length=length, seed=a["seed"], **summary(credit(agent, length, args.episodes))))
    trained.sort(key=lambda r: (r["run"].split("__")[1], r["length"], r["seed"]))

    lines = [
        "# Credit from the context to the query: prod_{t=2..L} |J_t| per eLSTM unit",
        "",
        "Written by `experiments/memory_credit.py`: log10 of the product, over units and episodes of the agent's own "
        f"policy ({args.episodes} episodes). Any exact gradient of the answer with respect to what a unit stored at the "
        "context step carries this factor.",
        "",
        "## Fresh agents (what learning starts from): median over units / best unit / fraction of units above 0.1",
        "",
        "| forget bias | " + " | ".join(f"L = {length}" for length in args.lengths) + " |",
        "| --- |" + " --- |" * len(args.lengths),
    ]
    for bias, row in fresh.items():
        cells = [f"{s['median']:.1f} / {s['best_unit']:.1f} / {s['above_0_1']:.2f}" for s in row.values()]
        lines.append(f"| {bias:g} | " + " | ".join(cells) + " |")
    if trained:
        lines += ["", "## Trained agents, at their own length", "", "| run | L | median | best unit | above 0.1 |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        for r in trained:
            lines.append(f"| `{r['run']}` | {r['length']} | {r['median']:.1f} | {r['best_unit']:.1f} | {r['above_0_1']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(args=vars(args), fresh={str(k): v for k, v in fresh.items()}, trained=trained), f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
