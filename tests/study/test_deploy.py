"""Chapter 5 (bnkit.study.deploy) run for real on a small budget, its figures recomputed here: which model each
ONNX file holds, how onnxruntime is told to run it, what is timed, and the predictions that changed."""
import collections
import copy
from pathlib import Path

import pytest
import torch

import bnkit.torch as bt
from bnkit.study import Context, deploy, missing_dependencies

pytestmark = pytest.mark.skipif(bool(missing_dependencies(("fold_bn", "export_onnx"))),
                                reason="bnkit.torch.fold_bn or export_onnx is not in this build")


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    """deploy.run at the quick size with one timed repeat and no optimizer step (one training-mode pass fills the
    running statistics), every model, export, onnxruntime session and timed input seen on the way."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    seen = {"exports": {}, "sessions": {}, "fed": {}, "torch_fed": [], "ops": {}}

    def one_pass(model, x, y, **kwargs):
        model.train()
        with torch.no_grad():
            model(x[:64])
        seen["model"] = model
        model.register_forward_pre_hook(
            lambda _m, args: None if torch.jit.is_tracing() else seen["torch_fed"].append(args[0].shape[0]))
        return 1

    real_fold, real_export, real_session, real_runner = bt.fold_bn, bt.export_onnx, ort.InferenceSession, \
        deploy._ort_runner

    def fold(model, x):
        folded, report = real_fold(model, x)
        seen["folded"] = folded
        return folded, report

    def export(model, x, path, **kwargs):
        out = real_export(model, x, path, **kwargs)
        ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        seen["exports"][Path(path).stem] = (model, ops)
        return out

    def session(path, opts=None, *args, **kwargs):
        if not isinstance(path, bytes):  # export_onnx's own check runs the file's bytes
            seen["sessions"][Path(path).stem] = (opts.graph_optimization_level,
                                                 list(kwargs.get("disabled_optimizers", [])))
        return real_session(path, opts, *args, **kwargs)

    def runner(path, disabled=()):
        run, fixed, ops = real_runner(path, disabled)
        seen["ops"][path.stem] = ops
        fed = seen["fed"].setdefault(path.stem, [])

        def counted(x):
            fed.append(len(x))
            return run(x)
        return counted, fixed, ops

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deploy, "fit", one_pass)
        mp.setitem(deploy.SIZES, "quick", {**deploy.SIZES["quick"], "repeats": 1})
        mp.setattr(bt, "fold_bn", fold)
        mp.setattr(bt, "export_onnx", export)
        mp.setattr(ort, "InferenceSession", session)
        mp.setattr(deploy, "_ort_runner", runner)
        ch = deploy.run(Context(size="quick", out=tmp_path_factory.mktemp("ch5")))
    seen["torch_timed"] = list(seen["torch_fed"])  # what the chapter ran, not the tests' own forward passes
    return ch, seen


def _digits():
    from bnkit.study.data import load_digits_split

    return load_digits_split(seed=0, images=True)


def test_each_onnx_variant_exports_the_model_it_names(chapter):
    """The 'BN nodes' runs must export the unfolded model and the 'folded' run the folded one (swapped, the table
    still printed 6 BN layers for the BN rows, derived from the PyTorch model, while onnxruntime ran the other)."""
    ch, seen = chapter
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in seen["model"].modules())
    assert n_bn == 6 == ch.data["bn_layers"]
    exports = seen["exports"]
    assert sorted(exports) == ["onnx_bn", "onnx_bn_nofusion", "onnx_folded"]
    for key in ("onnx_bn", "onnx_bn_nofusion"):
        model, ops = exports[key]
        assert model is seen["model"] and ops["BatchNormalization"] == n_bn, key
    model, ops = exports["onnx_folded"]
    assert model is seen["folded"] and ops["BatchNormalization"] == 0
    assert ops["Conv"] == exports["onnx_bn"][1]["Conv"]  # the same convolutions, the BN folded into them


def test_the_third_run_disables_only_onnxruntimes_conv_bn_fusion(chapter):
    """Like with like: all three runs keep every graph optimization on, the third disables ConvBNFusion alone (the
    study once compared the BN model with every optimization off against the folded one with all on)."""
    import onnxruntime as ort

    _, seen = chapter
    sessions = seen["sessions"]
    assert set(sessions) == {"onnx_bn", "onnx_folded", "onnx_bn_nofusion"}
    assert all(level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL for level, _ in sessions.values())
    assert sessions["onnx_bn"][1] == sessions["onnx_folded"][1] == []
    assert sessions["onnx_bn_nofusion"][1] == ["ConvBNFusion"] == [deploy.ORT_CONV_BN_FUSION]


def test_ort_runner_with_the_fusion_off_keeps_the_bn_work_and_every_other_optimization(tmp_path):
    """_ort_runner on a ResNet: the graph onnxruntime runs is the folded model's with the fusion on (op for op, no
    BatchNormalization), has more nodes with only ConvBNFusion off (BN nodes, or per-channel NCHWc convolutions
    where onnxruntime has those kernels), and none of the exported graph's Identity nodes (other optimizations still
    on; a node count would not show it: onnxruntime 1.19 adds NCHWc reorder nodes around the BN nodes); the logits
    match PyTorch eval mode on a batch size other than the exported one."""
    pytest.importorskip("onnxruntime")
    from bnkit.torch.zoo import SmallResNet

    x = _digits().x_test[:40]
    torch.manual_seed(0)
    model = SmallResNet().train()
    with torch.no_grad():
        model(x)
    model.eval()
    folded, _ = bt.fold_bn(model, x[:8])
    folded.eval()
    bt.export_onnx(model, x[:8], tmp_path / "bn.onnx")
    bt.export_onnx(folded, x[:8], tmp_path / "folded.onnx")
    import onnx

    exported = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "bn.onnx")).graph.node)
    with torch.no_grad():
        expected = model(x)
    runs = {}
    for name, path, disabled in (("bn", "bn.onnx", ()), ("folded", "folded.onnx", ()),
                                 ("nofusion", "bn.onnx", ("ConvBNFusion",))):
        run, _, ops = deploy._ort_runner(tmp_path / path, disabled)
        assert torch.allclose(torch.from_numpy(run(x[:13])), expected[:13], atol=1e-4), name
        runs[name] = ops
    total = {name: sum(ops.values()) for name, ops in runs.items()}
    assert runs["bn"] == runs["folded"] and runs["bn"]["BatchNormalization"] == 0
    assert total["nofusion"] > total["folded"]  # the BN work stays as ops of its own
    assert exported["Identity"] and not runs["nofusion"].get("Identity")  # not merely the exported graph


def test_predictions_changed_by_folding_are_counted_against_eval_mode(chapter):
    """The 'changed' figure of the folded model is the number of test images whose predicted class differs from
    the unfolded model's in eval mode, recomputed here with PyTorch's eager forward (== instead of != printed the
    number that did NOT change: every one of them)."""
    ch, seen = chapter
    x = _digits().x_test
    model, folded = copy.deepcopy(seen["model"]).eval(), seen["folded"]
    with torch.no_grad():
        ref, fold = model(x), folded(x)
    changed = int((fold.argmax(1) != ref.argmax(1)).sum())
    assert (fold - ref).abs().max() < 1e-4
    top2 = ref.topk(2, dim=1).values
    if (top2[:, 0] - top2[:, 1]).min() > 1e-3:  # no near-tie that float32 rounding could flip
        assert changed == 0
    assert ch.data["predictions_changed"]["folded"] == changed
    row = next(r for r in ch.tables[0].rows if r[0] == "torch folded")
    assert row[4] == str(changed)
    assert f"and {changed} of {len(x)} predictions changed" in ch.findings[0]
    for key in ("onnx_bn", "onnx_folded", "onnx_bn_nofusion"):
        assert ch.data["predictions_changed"][key] == changed


def test_latency_is_timed_on_batches_of_each_size_not_the_whole_test_set(chapter):
    """Each runtime is timed on x[:b] for every latency batch size b (here one round, every runtime and size once
    per round in a shuffled order, each timed call after an untimed one of its own); the ONNX runs are fed the
    whole test set once before, for their logits."""
    ch, seen = chapter
    n_test = len(_digits().x_test)
    sizes = list(deploy.SIZES["quick"]["latency_batches"])
    assert sizes == [1, 64] and n_test > 64

    def paired(calls, runners=1):  # each size twice in a row per runner: the untimed call, then the timed one
        return sorted(calls) == sorted(sizes * 2 * runners) and all(a == b for a, b in zip(calls[::2], calls[1::2]))

    for key in ("onnx_bn", "onnx_folded", "onnx_bn_nofusion"):
        assert seen["fed"][key][0] == n_test and paired(seen["fed"][key][1:]), key
    # the PyTorch models (the folded copy keeps the hook): fold_bn and the eval-mode logits first, the timed calls last
    assert paired(seen["torch_timed"][-4 * len(sizes):], runners=2)
    assert set(ch.data["latency_ms"]) == {"PyTorch eval (with BN)", "PyTorch folded", deploy.ONNX_BN,
                                          deploy.ONNX_FOLDED, deploy.ONNX_NOFUSE}
    assert all(list(lat) == [str(b) for b in sizes] for lat in ch.data["latency_ms"].values())


def test_identical_runners_time_alike_whatever_ran_before_them():
    """A runner called right after another's large batch pays for what that call left (simulated: the next two
    calls after the heavy one sleep 3 ms, so a single untimed call of its own does not absorb it). Identical
    runners must get the same median wherever they sit: in a fixed order, or one only rotated (which keeps every
    call's predecessor), the one after the heavy call paid every round."""
    import time as clock

    left = []

    def heavy(x):
        left[:] = [True, True]

    def light(x):
        if left:
            left.pop()
            clock.sleep(0.003)

    runners = {"heavy": heavy, **{name: light for name in "abcd"}}
    lat = deploy._latencies(runners, torch.zeros(4, 1), {"repeats": 25, "latency_batches": (1,)})
    assert all(lat[name]["1"] < 1.0 for name in "abcd"), lat  # ms: none pays the 3 ms in most rounds


def test_the_finding_counts_every_node_of_the_graphs_onnxruntime_runs(chapter):
    """The node counts in the finding are the total of the ops of each graph onnxruntime ran (a Counter's values
    summed, not its number of distinct op types), and its BatchNormalization counts are those graphs' own."""
    ch, seen = chapter
    ops = seen["ops"]
    assert set(ops) == {"onnx_bn", "onnx_folded", "onnx_bn_nofusion"}
    assert ch.data["ort_ops_run"] == {key: dict(c) for key, c in ops.items()}
    total = {key: sum(c.values()) for key, c in ops.items()}
    assert total["onnx_bn"] != len(ops["onnx_bn"])  # some op type occurs more than once, so a type count differs
    bn = {key: c["BatchNormalization"] for key, c in ops.items()}
    (finding,) = [f for f in ch.findings if f.startswith("onnxruntime:")]
    assert (f"the graph it runs has {total['onnx_bn']} nodes for the BN model ({bn['onnx_bn']} BatchNormalization) "
            f"and {total['onnx_folded']} for the folded one") in finding, finding
    assert f"With only that fusion off it runs {total['onnx_bn_nofusion']} ({bn['onnx_bn_nofusion']} " \
           "BatchNormalization)" in finding, finding


FUSION_CHECK = ("onnxruntime runs the BN model as the folded one: its Conv+BN fusion leaves no BN node and the folded "
                "model's node count; with only that fusion off it runs more nodes")


@pytest.mark.parametrize("case,holds", [
    ("as_run", True),
    ("bn_node_left", False),    # one node of the BN model's graph a BatchNormalization, the node count unchanged
    ("extra_node", False),      # no BN node left, but one node more than the folded model's graph
    ("fusion_ignored", False),  # the third run ran with the fusion on after all: as many nodes as the folded graph
])
def test_the_fusion_check_needs_no_bn_node_equal_counts_and_more_nodes_without_the_fusion(tmp_path, case, holds):
    """The check's three conditions each decide it on their own, with the graphs onnxruntime really ran altered in
    one way each: a BatchNormalization left (by its ONNX op type), a node count above the folded graph's, and a run
    "without the fusion" that has no more nodes than the folded graph."""
    pytest.importorskip("onnxruntime")
    real_runner = deploy._ort_runner

    def one_pass(model, x, y, **kwargs):
        model.train()
        with torch.no_grad():
            model(x[:64])
        return 1

    def runner(path, disabled=()):
        if case == "fusion_ignored" and disabled:
            return real_runner(path, ())
        run, fixed, ops = real_runner(path, disabled)
        if path.stem == "onnx_bn" and case == "bn_node_left":
            top = ops.most_common(1)[0][0]
            ops = ops - collections.Counter({top: 1}) + collections.Counter(BatchNormalization=1)
        if path.stem == "onnx_bn" and case == "extra_node":
            ops = ops + collections.Counter(Identity=1)
        return run, fixed, ops

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deploy, "fit", one_pass)
        mp.setitem(deploy.SIZES, "quick", {**deploy.SIZES["quick"], "repeats": 1})
        mp.setattr(deploy, "_ort_runner", runner)
        ch = deploy.run(Context(size="quick", out=tmp_path))
    assert ch.checks[FUSION_CHECK] is holds
