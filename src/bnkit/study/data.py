"""scikit-learn's bundled digits as tensors, split once, and the shifted domain of chapter 4.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships 1797 8x8 images
with 17 grey levels (0..16), scaled here to [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Digits", "load_digits_split", "shifted_domain", "SHIFT_DESCRIPTION"]

#: :func:`shifted_domain`'s scanner: ``contrast * x + background + noise_std * N(0, 1)``.
SHIFT_CONTRAST, SHIFT_BACKGROUND, SHIFT_NOISE_STD = 0.5, 0.3, 0.05
#: What :func:`shifted_domain` does to an image, in words for the report.
SHIFT_DESCRIPTION = (f"another scanner: contrast x{SHIFT_CONTRAST:g}, a grey background (+{SHIFT_BACKGROUND:g}) "
                     f"and sensor noise (std {SHIFT_NOISE_STD:g})")


@dataclass(frozen=True)
class Digits:
    """A stratified train/test split; ``x`` is ``(N, 64)`` or ``(N, 1, 8, 8)`` float32 in [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def subset(self, classes: tuple[int, ...]) -> "Digits":
        """Only the images whose label is in ``classes`` (both splits)."""
        keep_tr = torch.isin(self.y_train, torch.tensor(classes))
        keep_te = torch.isin(self.y_test, torch.tensor(classes))
        return Digits(self.x_train[keep_tr], self.y_train[keep_tr], self.x_test[keep_te], self.y_test[keep_te])


def load_digits_split(*, seed: int = 0, test_fraction: float = 0.25, images: bool = False) -> Digits:
    """Digits split with a fixed seed, stratified by label."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx = torch.arange(len(x)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=bunch.target)
    if images:
        x = x.view(-1, 1, 8, 8)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return Digits(x[tr], y[tr], x[te], y[te])


def shifted_domain(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """The same digits seen by another scanner (see :data:`SHIFT_DESCRIPTION`), seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return SHIFT_CONTRAST * x + SHIFT_BACKGROUND + SHIFT_NOISE_STD * torch.randn(x.shape, generator=g)
