"""``bnkit demo``: BatchNorm at inference, measured on scikit-learn's digits."""
from __future__ import annotations

import typer
from rich.table import Table

from .app import app, console


@app.command()
def demo(seed: int = typer.Option(0, help="Random seed.")) -> None:
    """Train a small BN network on digits and compare eval mode with training mode at batch 64 and 1."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1400], perm[1400:]
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(20):
        for idx in tr[torch.randperm(len(tr))].split(64):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    def accuracy(batch: int, train_mode: bool) -> float:
        model.train(train_mode)
        correct = 0
        with torch.no_grad():
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            for idx in te.split(batch):
                if train_mode and batch == 1:
                    # nn.BatchNorm1d refuses a (1, C) batch in training mode; do by hand what it would compute
                    h = model[0](x[idx])
                    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
                    out = model[3](model[2](h * model[1].weight + model[1].bias))
                else:
                    out = model(x[idx])
                correct += int((out.argmax(1) == y[idx]).sum())
            model.load_state_dict(saved)
        return correct / len(te)

    table = Table(title="BatchNorm at inference on digits (test set, 397 images)")
    table.add_column("mode")
    table.add_column("batch size", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_row("eval (running statistics)", "any", f"{accuracy(64, False):.3f}")
    table.add_row("training (batch statistics)", "64", f"{accuracy(64, True):.3f}")
    table.add_row("training (batch statistics)", "1", f"{accuracy(1, True):.3f}")
    model.eval()
    console.print(table)
    console.print(
        f"chance level is 0.1; at batch size 1 every normalized activation is (x - x) / sqrt(0 + eps) = 0, "
        f"so the output is the same for every image. numpy {np.__version__}, torch {torch.__version__}."
    )
