"""Shared fixtures for the ONNX tests: calibrated zoo models and their legacy-exporter graphs."""
from __future__ import annotations

import io
import warnings

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _calibrated(name: str, seed: int = 0):
    """A zoo model calibrated on its example input (see ``_helpers.calibrated``), and a fresh input."""
    from _helpers import calibrated

    from bnkit.torch.zoo import ZOO, example_input

    torch.manual_seed(seed)
    model = calibrated(ZOO[name](), example_input(name, batch=8, seed=seed), seed, positive=True)
    return model, example_input(name, batch=4, seed=seed + 1)


def _export(model, x, *, training: bool = False, opset: int = 17) -> "onnx.ModelProto":
    """torch.onnx's TorchScript exporter, BN nodes kept (no constant folding), dynamic batch axis."""
    buffer = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, training=mode, opset_version=opset,
                          do_constant_folding=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def _kiai_export(nan_channel=None):
    """Conv + BN exported with keep_initializers_as_inputs=True: every initializer is also a graph input."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 1.5)
        if nan_channel is not None:
            model[1].running_var[nan_channel] = float("nan")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 6, 6),), buffer, dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["x"], keep_initializers_as_inputs=True)
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="session")
def calibrated():
    return _calibrated


@pytest.fixture(scope="session")
def export():
    return _export


@pytest.fixture(scope="session")
def zoo_onnx():
    """``zoo_onnx(name) -> (model, x, ModelProto)``, cached per name."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model, x = _calibrated(name)
            cache[name] = (model, x, _export(model, x))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def kiai_export():
    return _kiai_export
