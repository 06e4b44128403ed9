"""The training loop and the measurements every chapter shares.

* :func:`fit`: Adam on cross-entropy, reshuffled each epoch with a seeded
  generator, ``model.train()`` at the start of every epoch as every real loop
  does (chapter 4 depends on that). Batches come from :func:`batches`: a
  remainder of at most half a batch joins the batch before it, so no step
  feeds the running statistics a batch much smaller than the rest.
* :func:`accuracy` / :func:`predict`: in eval mode, or in training mode with
  every BN buffer and every module's ``training`` flag restored afterwards.
* :func:`population_stats`: the exact mean and biased variance of every BN
  layer's input over a whole dataset, in float64 with
  :class:`bnkit.stats.RunningMoments`, as seen when every upstream BN layer
  normalizes with the statistics of the whole dataset (one training-mode
  forward pass on a copy, so the model is untouched).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..stats import RunningMoments
from ..torch.modules import bn_layers

__all__ = [
    "fit",
    "batches",
    "predict",
    "accuracy",
    "population_stats",
    "running_stats",
    "preserved_modes",
]


def batches(n: int, batch_size: int, *, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Index batches covering ``n`` samples (shuffled when a generator is given).

    Every batch holds ``batch_size`` samples except the last: a remainder of at most
    ``batch_size // 2`` joins the batch before it, so the last holds more than half a
    batch and at most one and a half (or all ``n`` when ``n < batch_size``). A much
    smaller last batch would be a noisy training step whose statistics the running
    statistics weigh as much as a full batch's (at momentum 0.5, half of them), right
    before each epoch's measurements; a batch of one cannot be normalized at all.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    out = list(order.split(batch_size))
    if len(out) > 1 and len(out[-1]) <= batch_size // 2:
        out[-2:] = [torch.cat(out[-2:])]
    return out


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> int:
    """Train with Adam; return the number of optimizer steps taken.

    Only parameters with ``requires_grad`` are optimized. ``on_step(step)`` runs
    after each step, ``on_epoch(epoch)`` after each epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        model.train()
        for idx in batches(len(x), batch_size, generator=g):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
        if on_epoch is not None:
            on_epoch(epoch)
    return step


@contextmanager
def preserved_modes(model: nn.Module, *, restore_buffers: bool = True) -> Iterator[nn.Module]:
    """Restore every module's ``training`` flag (and all buffers) on exit."""
    flags = {m: m.training for m in model.modules()}
    saved = {k: v.detach().clone() for k, v in model.named_buffers()} if restore_buffers else {}
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag
        if saved:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(saved[k])


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512, train_mode: bool = False) -> torch.Tensor:
    """Logits for ``x`` fed in consecutive batches of ``batch_size`` (as :func:`batches` splits), with no gradients.

    With ``train_mode=True`` BN layers normalize with each batch's statistics; the
    running statistics they overwrite on the way are restored afterwards.
    """
    with preserved_modes(model, restore_buffers=train_mode), torch.no_grad():
        model.train(train_mode)
        return torch.cat([model(x[idx]) for idx in batches(len(x), batch_size)])


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512, train_mode: bool = False
) -> float:
    """Fraction of ``x`` classified correctly (see :func:`predict`)."""
    logits = predict(model, x, batch_size=batch_size, train_mode=train_mode)
    return float((logits.argmax(1) == y).double().mean())


def population_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{bn_name: (mean, biased var)}`` of each BN layer's input over all of ``x``, float64."""
    work = copy.deepcopy(model)
    moments: dict[str, RunningMoments] = {}
    hooks = []
    for name, bn in bn_layers(work):
        moments[name] = RunningMoments(bn.num_features)

        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
            moments[name].update(inputs[0].detach().double().numpy(), channel_axis=1)

        hooks.append(bn.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            work.train()
            work(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: (m.mean, m.var) for name, m in moments.items()}


def running_stats(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{bn_name: (running_mean, running_var)}`` as float64 copies."""
    return {
        name: (bn.running_mean.detach().double().numpy().copy(), bn.running_var.detach().double().numpy().copy())
        for name, bn in bn_layers(model)
    }


def stat_shift(ref_mean: np.ndarray, ref_var: np.ndarray, mean: np.ndarray, var: np.ndarray,
               eps: float) -> tuple[float, float]:
    """How far ``(mean, var)`` is from ``(ref_mean, ref_var)``, averaged over channels.

    The mean shift in reference standard deviations, ``mean(|m - m_ref| / sqrt(v_ref + eps))``, and
    the absolute log variance ratio, ``mean(|log((v + eps) / (v_ref + eps))|)``.
    """
    mean_shift = float(np.mean(np.abs(mean - ref_mean) / np.sqrt(ref_var + eps)))
    log_var = float(np.mean(np.abs(np.log((var + eps) / (ref_var + eps)))))
    return mean_shift, log_var
