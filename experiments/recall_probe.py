"""What the eLSTM can hold, apart from RL: rtrl_a2c_popgym.py's own agent (cell, output gate, policy head) trained
supervised, by full BPTT and Adam, to name the card it saw k steps ago (POPGym's RepeatPrevious without the
environment, the reward or the credit assignment), against the standard LSTM of the same script.

Random cards (4 suits, one-hot) for k + 32 steps; the loss and the accuracy are on the steps that have a card k back.
Chance: 0.25.

    python experiments/recall_probe.py --cells elstm lstm --hidden-sizes 256 --delays 4 32 --steps 2000
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rtrl_a2c_popgym as pg  # noqa: E402


@dataclass
class Args:
    cells: tuple[str, ...] = ("elstm", "lstm")
    """elstm: the script's eLSTM (its gradient here is BPTT's, which RTRL equals); lstm: its standard LSTM"""
    hidden_sizes: tuple[int, ...] = (128, 256, 512)
    """N"""
    delays: tuple[int, ...] = (4, 32)
    """k: name the card seen k steps ago (RepeatPrevious Easy / Medium: 4 / 32)"""
    steps: int = 2000
    """Adam steps of 64 sequences each"""
    learning_rate: float = 3e-3
    """Adam's learning rate"""
    seed: int = 0
    """torch's seed"""


def recall_accuracy(cell, n, k, args):
    """Train one agent for k; its accuracy on 1,024 fresh sequences."""
    torch.manual_seed(args.seed)
    agent = pg.Agent((4,), 4, n, "lstm" if cell == "lstm" else "rtrl", forget_bias=3.0)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate)
    steps = k + 32

    def loss_and_accuracy(batch):
        cards = torch.randint(0, 4, (steps, batch))
        x = agent.features(F.one_hot(cards, 4).float(), torch.zeros(steps, batch))
        c = agent.cell(x, agent.cell.initial_state(batch)[0], torch.zeros(steps, batch, dtype=torch.bool))
        logits = agent.heads(x, c)[0][k:]
        loss = F.cross_entropy(logits.flatten(0, 1), cards[:-k].flatten())
        return loss, (logits.argmax(-1) == cards[:-k]).float().mean().item()

    for _ in range(args.steps):
        loss = loss_and_accuracy(64)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return loss_and_accuracy(1024)[1]


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    print(f"| cell | N | {' | '.join(f'k = {k}' for k in args.delays)} |")
    print("| --- | --- |" + " --- |" * len(args.delays))
    for cell in args.cells:
        for n in args.hidden_sizes:
            cells = []
            for k in args.delays:
                start = time.time()
                cells.append(f"{recall_accuracy(cell, n, k, args):.3f} ({time.time() - start:.0f} s)")
            print(f"| {cell} | {n} | {' | '.join(cells)} |", flush=True)
