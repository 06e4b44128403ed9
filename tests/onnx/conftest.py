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
