"""Fixtures shared by the study tests."""
import pytest
import torch

from bnkit.study.models import digits_mlp
from bnkit.study.train import fit


@pytest.fixture(scope="module")
def trained():
    """A small digits MLP (16, 8 hidden) fitted for 2 epochs on 96 random images, in eval mode, with its data."""
    torch.manual_seed(0)
    x = torch.rand(96, 64)
    y = torch.randint(0, 10, (96,))
    model = digits_mlp(hidden=(16, 8))
    fit(model, x, y, epochs=2, batch_size=16, seed=0)
    model.eval()
    return model, x, y
