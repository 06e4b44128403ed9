"""bnkit.torch.export_onnx's graph inputs and outputs: which carry the dynamic batch axis (0-d tensors and tensors
without a batch dimension keep their fixed shapes) and None outputs (dropped, as torch.onnx drops them), checked
with onnxruntime at another batch size against the PyTorch model's own outputs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import rel, set_running_stats
from torch import nn

from bnkit.torch import export_onnx
from bnkit.torch.export import ExportVerificationError


class _ConvBN(nn.Module):
    """Conv 3 -> 4 channels and a BN with stored statistics; ``forward`` is each test's own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        set_running_stats(self.bn, torch.randn(4), torch.rand(4) + 0.5)
        self.eval()


class _Scaled(_ConvBN):
    def forward(self, x, temperature, bias):
        return self.bn(self.conv(x)) / temperature + bias


class _Summaries(_ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y, y.mean(), y.mean((0, 2, 3))  # per sample; one number; per channel (4 channels, batch of 4)


class _Optional(_ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y, None, y.mean((2, 3))  # an optional auxiliary output left out


def _declared(values) -> dict[str, list]:
    """``{name: [dim_param or dim_value, ...]}`` of graph inputs or outputs."""
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_a_0d_input_and_an_input_without_the_batch_axis_keep_their_shapes_and_run_at_another_batch(tmp_path):
    """A 0-d temperature and a (1, 4, 1, 1) bias beside a batch of 3: only the batch input is declared dynamic
    (torch.onnx raised on the 0-d input, and the bias was declared with the batch's symbol); onnxruntime on a batch
    of 5 matches the PyTorch model."""
    model, path = _Scaled(), tmp_path / "scaled.onnx"
    temperature, bias = torch.tensor(2.0), torch.randn(1, 4, 1, 1)
    export_onnx(model, (torch.randn(3, 3, 4, 4), temperature, bias), path, input_names=["x", "t", "b"])
    assert _declared(onnx.load(path).graph.input) == {"x": ["batch", 3, 4, 4], "t": [], "b": [1, 4, 1, 1]}
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    (got,) = _session(path).run(None, {"x": x.numpy(), "t": temperature.numpy(), "b": bias.numpy()})
    with torch.no_grad():
        want = model(x, temperature, bias).double().numpy()
    assert got.shape == want.shape and rel(got, want) < 1e-5


def test_only_outputs_with_the_batch_axis_are_declared_dynamic(tmp_path):
    """A per-sample output, a 0-d mean and a per-channel mean whose size (4) is the example batch's: the declared
    output shapes are those of the PyTorch model's outputs on a batch of 5 ('batch' standing for 5), and onnxruntime
    computes them there."""
    model, path = _Summaries(), tmp_path / "summaries.onnx"
    report = export_onnx(model, torch.randn(4, 3, 4, 4), path, output_names=["y", "mean", "channels"])
    assert report.batch_sizes == [4, 1]
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [t.double().numpy() for t in model(x)]
    declared = _declared(onnx.load(path).graph.output)
    assert {name: [5 if d == "batch" else d for d in dims] for name, dims in declared.items()} == {
        name: list(w.shape) for name, w in zip(("y", "mean", "channels"), want)}
    assert declared["y"][0] == "batch"
    got = _session(path).run(None, {"input": x.numpy()})
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(rel(g, w) < 1e-5 for g, w in zip(got, want))


def test_a_none_output_is_dropped_and_the_tensors_around_it_keep_their_names(tmp_path):
    """``(y, None, pooled)``: exported as two outputs, as torch.onnx.export does, named in order, and onnxruntime's
    outputs on a batch of 5 are the PyTorch model's y and pooled."""
    model, path = _Optional(), tmp_path / "optional.onnx"
    report = export_onnx(model, torch.randn(3, 3, 4, 4), path, output_names=["y", "pooled"])
    assert report.max_rel_diff < 1e-5
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["y", "pooled"]
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        y, _, pooled = model(x)
    assert [g.shape for g in got] == [(5, 4, 4, 4), (5, 4)]
    assert rel(got[0], y.double().numpy()) < 1e-5 and rel(got[1], pooled.double().numpy()) < 1e-5
    with pytest.raises(ValueError, match="3 output names given for 2 outputs"):
        export_onnx(model, torch.randn(3, 3, 4, 4), tmp_path / "three.onnx", output_names=["y", "aux", "pooled"])
    assert not (tmp_path / "three.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["optional.onnx"]


class _TemperedSummaries(_ConvBN):
    def forward(self, x, temperature):
        y = self.bn(self.conv(x)) / temperature
        return y, y.mean((0, 2, 3))  # per sample; per channel (4 channels, batch of 4)


@pytest.mark.parametrize("verify", [True, False])
def test_beside_a_0d_input_a_per_channel_output_the_size_of_the_batch_keeps_its_shape(tmp_path, verify):
    """A 0-d temperature beside a batch of 4, and a per-channel mean of 4 values: the first sample alone (the batch
    input cut, the 0-d input not) shows the mean is not batched, with or without the onnxruntime check, so it is
    declared (4,); onnxruntime on a batch of 2 gives the PyTorch model's outputs with the declared shapes."""
    model, path = _TemperedSummaries(), tmp_path / "tempered.onnx"
    temperature = torch.tensor(2.0)
    report = export_onnx(model, (torch.randn(4, 3, 4, 4), temperature), path, input_names=["x", "t"],
                         output_names=["y", "channels"], verify=verify)
    assert report.batch_sizes == ([4, 1] if verify else [])
    assert _declared(onnx.load(path).graph.output) == {"y": ["batch", 4, 4, 4], "channels": [4]}
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    got = _session(path).run(None, {"x": x.numpy(), "t": temperature.numpy()})
    with torch.no_grad():
        want = [t.double().numpy() for t in model(x, temperature)]
    assert [g.shape for g in got] == [w.shape for w in want] == [(2, 4, 4, 4), (4,)]
    assert all(rel(g, w) < 1e-5 for g, w in zip(got, want))


class _BakedBatch(nn.Module):
    """A Linear on ``x.view(4, -1)``: the batch size 4 is baked into the graph, beside a 0-d temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 3)

    def forward(self, x, temperature):
        return self.lin(x.view(4, -1)) / temperature


@pytest.mark.parametrize("verify", [True, False])
def test_a_model_that_fails_on_the_first_sample_alone_is_refused_beside_a_0d_input(tmp_path, verify):
    """The batch-of-one run backs the dynamic axis whatever the other inputs and ``verify``: PyTorch itself cannot
    run the model on one sample (view(4, -1) of 12 values), so a graph declared with a 'batch' axis that fails at any
    other batch size in onnxruntime is not written."""
    path = tmp_path / "baked.onnx"
    with pytest.raises(ExportVerificationError, match="first sample alone.*dynamic_batch=False"):
        export_onnx(_BakedBatch().eval(), (torch.randn(4, 3, 4), torch.tensor(2.0)), path, verify=verify)
    assert not path.exists()


class _Defaults(_ConvBN):
    def forward(self, x, scale=2.0, mask=None, *, shift=0.5):
        y = self.bn(self.conv(x)) * scale + shift
        return y if mask is None else y * mask


@pytest.mark.parametrize("verify", [True, False])
def test_arguments_left_at_their_defaults_are_constants_of_the_graph_not_inputs(tmp_path, verify):
    """torch.onnx's TorchScript exporter appends a forward's defaults to the example inputs, and the tracer makes
    scale=2.0 a float64 graph input: the check failed naming 'onnx::Cast_1', and with verify=False the file needed
    an input nobody named. Oracle: PyTorch's eval output with the defaults, run by onnxruntime from x alone."""
    model, path = _Defaults(), tmp_path / "defaults.onnx"
    x = torch.randn(4, 3, 5, 5)
    export_onnx(model, x, path, verify=verify)
    assert [i.name for i in onnx.load(path).graph.input] == ["input"]
    with torch.no_grad():
        for batch in (x, torch.randn(2, 3, 5, 5)):
            got = _session(path).run(None, {"input": batch.numpy()})[0]
            assert rel(got, model(batch).double().numpy()) < 1e-6
    assert "forward" not in vars(model)  # the model's own forward again


class _Keywords(_ConvBN):
    def forward(self, x, *, mask, inner=False):
        y = self.bn(self.conv(x)) * mask
        return y if inner else y + self(x.flip(3), mask=mask, inner=True)  # a test-time augmentation


def test_keywords_a_hook_or_the_forward_passes_still_reach_the_forward(tmp_path):
    """The wrapper that keeps defaults out of the graph took positional arguments only: a pre-hook's keywords
    (with_kwargs=True) and a forward calling itself with one raised TypeError naming bnkit's wrapper."""
    model, path = _Keywords(), tmp_path / "keywords.onnx"
    two = torch.tensor(2.0)
    model.register_forward_pre_hook(lambda m, args, kwargs: (args, {"mask": two, **kwargs}), with_kwargs=True)
    x = torch.randn(4, 3, 5, 5)
    export_onnx(model, x, path)
    assert [i.name for i in onnx.load(path).graph.input] == ["input"]
    with torch.no_grad():
        assert rel(_session(path).run(None, {"input": x.numpy()})[0], model(x).double().numpy()) < 1e-6


class _Unused(_ConvBN):
    def forward(self, x, mask):  # an auxiliary input this model ignores
        return self.bn(self.conv(x))


@pytest.mark.parametrize("fold", [False, True])
def test_an_input_the_forward_never_reads_is_left_out_of_the_graph_and_of_the_check(tmp_path, fold):
    """torch.onnx drops an input the forward ignores; the onnxruntime check still fed it, and onnxruntime refused the
    feeds ("Invalid input name"), so a correct graph was never written. Oracle: the model's own output."""
    model, x, mask = _Unused(), torch.randn(4, 3, 5, 5), torch.ones(4, 8)
    report = export_onnx(model, (x, mask), tmp_path / "m.onnx", fold=fold)
    assert report.max_rel_diff < 1e-5
    session = _session(tmp_path / "m.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_0"]
    x2 = torch.randn(3, 3, 5, 5)
    assert rel(torch.from_numpy(session.run(None, {"input_0": x2.numpy()})[0]), model(x2, mask[:3]).detach().numpy()) < 1e-5


def test_names_opset_and_outputs_are_checked_before_anything_is_exported(tmp_path):
    """Repeated or empty names were renamed by torch.onnx (a file written with outputs 'o.1' and 'o', or '10'), a
    name used for an input and an output broke the check, opset '17' / 17.0 / True / None reached torch's own errors
    (None wrote opset 20 and reported None), and a model with only None outputs wrote a file onnxruntime cannot
    load. Oracle: onnxruntime's names for a file written with valid ones."""
    model, x = _Summaries(), torch.randn(4, 3, 5, 5)
    for names, match in (({"output_names": ["o", "o", "p"]}, "output names must differ"),
                         ({"output_names": ["", "o", "p"]}, "output names must be non-empty strings"),
                         ({"input_names": ["y"], "output_names": ["x", "y", "z"]}, "an input and an output alike"),
                         ({"opset": "17"}, "opset must be an integer"), ({"opset": True}, "opset must be an integer"),
                         ({"opset": None}, "opset must be an integer"), ({"opset": 6}, "opset must be from 7 to"),
                         ({"opset": 30}, "opset must be from 7 to")):
        with pytest.raises(ValueError, match=match):
            export_onnx(model, x, tmp_path / "m.onnx", **names)
        assert not (tmp_path / "m.onnx").exists()
    report = export_onnx(model, x, tmp_path / "m.onnx", input_names=["x"], output_names=["a", "b", "c"],
                         opset=np.int64(13))
    assert type(report.opset) is int and onnx.load(tmp_path / "m.onnx").opset_import[0].version == 13
    assert [o.name for o in _session(tmp_path / "m.onnx").get_outputs()] == ["a", "b", "c"]

    class Nothing(_ConvBN):
        def forward(self, x):
            self.bn(self.conv(x))
            return None

    for verify in (True, False):
        with pytest.raises(ValueError, match="output holds no tensors"):
            export_onnx(Nothing(), x, tmp_path / "n.onnx", verify=verify)
    assert not (tmp_path / "n.onnx").exists()


def test_a_first_sample_with_no_finite_output_does_not_fail_the_batch_axis(tmp_path):
    """log(bn(x)) with sample 0 all negative: the batch of one compares nothing finite, and the export was refused
    as failing on the batch axis (advising dynamic_batch=False). Oracle: the PyTorch model at other batch sizes."""

    class Log(_ConvBN):
        def forward(self, x):
            y = self.bn(self.conv(x))  # each sample's largest input: the log of a negative one is NaN
            return torch.log(y * 1e-3 + x.amax(dim=(1, 2, 3)).view(-1, 1, 1, 1))

    model = Log()
    x = torch.randn(5, 3, 5, 5)
    x[0] = -50.0
    assert torch.isnan(model(x[:1])).all() and torch.isfinite(model(x[1:])).any()
    report = export_onnx(model, x, tmp_path / "m.onnx")
    assert report.batch_sizes == [5, 1]
    x3 = torch.randn(3, 3, 5, 5)
    got = _session(tmp_path / "m.onnx").run(None, {"input": x3.numpy()})[0]
    want = model(x3).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
