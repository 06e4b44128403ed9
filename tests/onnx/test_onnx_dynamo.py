"""bnkit.onnx on graphs from torch.onnx's default exporter (``dynamo=True``, which needs onnxscript).

The rest of the ONNX tests use the TorchScript exporter, which keeps every BatchNormalization node.
These pin what users of the default exporter get: with its graph optimizations on (the default) it folds
eval-mode BN itself, so the audit has nothing to read; with ``optimize=False`` the nodes stay, and the
audit and the fold must read them as exported (ONNX momentum on the old value, parameters as initializers,
a bias-free Conv's zero bias computed by Shape/Expand/CastLike nodes),
with onnxruntime against PyTorch's eval output as the oracle.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from _helpers import ort_run, rel  # noqa: E402

from bnkit.onnx import audit, fold  # noqa: E402
from bnkit.torch import bn_layers  # noqa: E402


def _dynamo_export(model, x, path, *, optimize: bool):
    """``torch.onnx.export(..., dynamo=True)``, its warnings and log lines (no torchvision here) silenced."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=optimize, verbose=False)
    finally:
        logger.setLevel(level)
    return onnx.load(str(path))


def _run(proto, x):
    return ort_run(proto, {proto.graph.input[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name, optimize) -> (model, x, path, proto)``, cached."""
    from _helpers import calibrated

    from bnkit.torch.zoo import ZOO, example_input

    cache = {}

    def get(name: str, optimize: bool):
        if (name, optimize) not in cache:
            model = calibrated(ZOO[name](), example_input(name, batch=8, seed=0), 0, positive=True)
            x = example_input(name, batch=4, seed=1)
            path = tmp_path_factory.mktemp("dynamo") / f"{name}_{optimize}.onnx"
            cache[name, optimize] = (model, x, path, _dynamo_export(model, x, path, optimize=optimize))
        return cache[name, optimize]

    return get


@pytest.mark.parametrize("name", ["resnet", "mlp"])
def test_default_dynamo_export_folds_bn_itself_and_the_audit_says_it_has_nothing_to_read(name, exported):
    model, x, path, proto = exported(name, True)
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    with torch.no_grad():
        assert rel(_run(proto, x), model(x).double().numpy()) < 1e-5  # folded as eval mode by the exporter
    report = audit(path)
    assert report.ok and report.nodes == []
    (finding,) = report.findings
    assert finding.code == "no_bn" and finding.severity == "info"
    assert "audit the PyTorch model" in finding.fix  # the statistics it folded can no longer be checked here


def test_unoptimized_dynamo_export_audit_reads_each_bn_node_as_pytorch_holds_it(exported):
    model, _, path, proto = exported("mlp", False)
    layers = [bn for _, bn in bn_layers(model)]
    report = audit(path)
    assert report.ok and len(report.nodes) == len(layers)
    for node, bn in zip(report.nodes, layers):
        assert node["channels"] == bn.num_features and not node["training"]
        assert node["momentum"] == pytest.approx(1 - bn.momentum)  # ONNX weighs the old value
        assert node["epsilon"] == pytest.approx(bn.eps)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    bn_nodes = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    for node, bn in zip(bn_nodes, layers):
        np.testing.assert_array_equal(inits[node.input[3]], bn.running_mean.numpy())
        np.testing.assert_array_equal(inits[node.input[4]], bn.running_var.numpy())


def test_unoptimized_dynamo_export_with_never_updated_statistics_is_an_error(tmp_path):
    from bnkit.torch.zoo import ZOO, example_input

    torch.manual_seed(0)
    model = ZOO["mlp"]().eval()  # never trained: every running mean 0, every running var 1
    path = tmp_path / "fresh.onnx"
    _dynamo_export(model, example_input("mlp", batch=2, seed=0), path, optimize=False)
    report = audit(path)
    assert not report.ok
    assert {f.code for f in report.findings if f.severity == "error"} == {"never_updated"}


def test_unoptimized_dynamo_export_folds_into_gemm_and_matches_pytorch(exported, tmp_path):
    model, x, path, _ = exported("mlp", False)
    out = tmp_path / "folded.onnx"
    report = fold(path, out)
    assert len(report.folded) == 2 and not report.left and {f.op for f in report.folded} == {"Gemm"}
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # static batch: the export's size
    with torch.no_grad():
        assert rel(_run(folded, x2), model(x2).double().numpy()) < 1e-5


def test_unoptimized_dynamo_export_convs_without_bias_fold_through_the_computed_zero_bias(exported, tmp_path):
    # the exporter gives a bias-free Conv a zero bias computed by Shape/Expand/CastLike nodes: read as the
    # constant it is, the BN folds, and the nodes that computed it go
    model, x, path, proto = exported("resnet", False)
    assert {"Shape", "Expand", "CastLike"} <= {n.op_type for n in proto.graph.node}
    out = tmp_path / "folded.onnx"
    report = fold(path, out)
    assert len(report.folded) == len(bn_layers(model)) and not report.left
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert not {"BatchNormalization", "Shape", "Expand", "CastLike"} & {n.op_type for n in folded.graph.node}
    with torch.no_grad():
        assert rel(_run(folded, x), model(x).double().numpy()) < 1e-5
