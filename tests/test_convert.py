"""bnkit.convert_state: round trips, the three classic slips, bad input, and ONNX checked in onnxruntime."""
import itertools
import re

import numpy as np
import pytest

import bnkit
from bnkit import BatchNorm
from bnkit.convert import FRAMEWORKS, convert_state

C = 4
RNG = np.random.default_rng(0)
GAMMA, BETA = RNG.uniform(0.5, 2, C).astype(np.float32), RNG.normal(size=C).astype(np.float32)
MEAN, VAR = RNG.normal(size=C).astype(np.float32), RNG.uniform(0.1, 3, C).astype(np.float32)

# The same layer in each framework's own layout: eps 1e-4, new-value weight 0.2.
SAMPLES = {
    "torch": {"state_dict": {"weight": GAMMA, "bias": BETA, "running_mean": MEAN, "running_var": VAR,
                             "num_batches_tracked": np.array(7)},
              "config": {"num_features": C, "eps": 1e-4, "momentum": 0.2, "affine": True, "bias": True,
                         "track_running_stats": True}},
    "keras": {"weights": {"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN, "moving_variance": VAR},
              "config": {"axis": -1, "momentum": 0.8, "epsilon": 1e-4, "center": True, "scale": True}},
    "flax": {"variables": {"params": {"scale": GAMMA, "bias": BETA}, "batch_stats": {"mean": MEAN, "var": VAR}},
             "config": {"axis": -1, "momentum": 0.8, "epsilon": 1e-4, "use_bias": True, "use_scale": True}},
    "onnx": {"initializers": {"scale": GAMMA, "B": BETA, "input_mean": MEAN, "input_var": VAR},
             "attributes": {"epsilon": 1e-4, "momentum": 0.8}},
}


def assert_same(a, b):
    """Equal nested structure, arrays equal bit for bit with the same dtype, scalars equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        b = np.asarray(b)
        assert a.dtype == b.dtype and np.array_equal(a, b), (a, b)
    else:
        assert a == b and type(a) is type(b), (a, b)


@pytest.mark.parametrize("src,dst", list(itertools.product(FRAMEWORKS, FRAMEWORKS)))
def test_every_pair_converts_to_the_same_layer(src, dst):
    out = convert_state(SAMPLES[src], src, dst, **({"axis": -1} if dst in ("keras", "flax") else {}))
    expected = SAMPLES[dst]
    if dst == "torch" and src != "torch":  # num_batches_tracked exists only in torch
        expected = {"state_dict": {k: v for k, v in expected["state_dict"].items() if k != "num_batches_tracked"},
                    "config": expected["config"]}
    assert_same(out, expected)
    back = convert_state(out, dst, src, **({"axis": -1} if src in ("keras", "flax") else {}))
    if src == "torch" and dst != "torch":
        back["state_dict"]["num_batches_tracked"] = np.array(7)
    assert_same(back, SAMPLES[src])


@pytest.mark.parametrize("center,scale", [(True, False), (False, True), (False, False)])
def test_keras_flax_flags_round_trip_and_map_to_torch(center, scale):
    weights = {k: v for k, v, on in (("gamma", GAMMA, scale), ("beta", BETA, center),
                                     ("moving_mean", MEAN, True), ("moving_variance", VAR, True)) if on}
    keras = {"weights": weights, "config": {"axis": 1, "momentum": 0.95, "epsilon": 2e-3, "center": center,
                                            "scale": scale}}
    flax = convert_state(keras, "keras", "flax")
    assert (flax["config"]["use_bias"], flax["config"]["use_scale"]) == (center, scale)
    assert_same(convert_state(flax, "flax", "keras"), keras)
    torch = convert_state(keras, "keras", "torch")
    cfg, sd = torch["config"], torch["state_dict"]
    assert cfg["momentum"] == 0.05 and cfg["eps"] == 2e-3
    if scale:  # torch expresses weight-only (bias=False) and neither exactly: the round trip is exact
        assert (cfg["affine"], cfg["bias"]) == (True, center)
        assert_same(convert_state(torch, "torch", "keras"), keras)
    elif center:  # bias without weight does not exist in torch: weight = 1, same function
        assert cfg["affine"] and cfg["bias"]
        np.testing.assert_array_equal(sd["weight"], np.ones(C, np.float32))
        np.testing.assert_array_equal(sd["bias"], BETA)
    else:
        assert not cfg["affine"] and "weight" not in sd and "bias" not in sd
        assert_same(convert_state(torch, "torch", "keras"), keras)


def test_same_inference_and_same_running_mean_under_each_convention():
    """Converted hyper-parameters make bnkit's reference layer behave the same in every convention."""
    x_batches = [RNG.normal(2.0, 3.0, size=(16, C)) for _ in range(3)]
    x_eval = RNG.normal(size=(5, C))
    outs, means = {}, {}
    for fw in FRAMEWORKS:
        st = convert_state(SAMPLES["keras"], "keras", fw)
        t = convert_state(st, fw, "torch")  # read every layout back through one reader
        cfg = {"torch": st.get("config"), "onnx": st.get("attributes")}.get(fw, st.get("config"))
        eps = cfg["eps" if fw == "torch" else "epsilon"]
        bn = BatchNorm(C, eps=eps, momentum=cfg["momentum"], convention=fw)
        bn.load_state_dict({k: v for k, v in t["state_dict"].items() if k != "num_batches_tracked"}, strict=False)
        outs[fw] = bn.eval()(x_eval)
        bn.train()
        for xb in x_batches:
            bn(xb)
        means[fw] = bn.running_mean
    for fw in FRAMEWORKS:
        np.testing.assert_allclose(outs[fw], outs["keras"], rtol=1e-12)
        np.testing.assert_allclose(means[fw], means["keras"], rtol=1e-12)


def test_convert_state_is_exported_at_top_level():
    assert bnkit.convert_state is convert_state and "convert_state" in bnkit.__all__


def test_classic_slip_defaults_are_never_assumed():
    for fw, part, key in (("torch", "config", "eps"), ("keras", "config", "epsilon"), ("flax", "config", "momentum"),
                          ("onnx", "attributes", "epsilon")):
        bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SAMPLES[fw].items()}
        del bad[part][key]
        with pytest.raises(ValueError, match="never assumes a default"):
            convert_state(bad, fw, "torch")
    # torch's eps 1e-5 stays 1e-5 in Keras (whose own default is 1e-3), and is stated explicitly
    st = {"state_dict": {"running_mean": MEAN, "running_var": VAR}, "config": {"eps": 1e-5, "momentum": 0.1}}
    assert convert_state(st, "torch", "keras")["config"]["epsilon"] == 1e-5
    assert convert_state(st, "torch", "onnx")["attributes"] == {"epsilon": 1e-5, "momentum": 0.9}


@pytest.mark.parametrize("src,m,dst,expected", [
    ("torch", 0.1, "keras", 0.9), ("keras", 0.99, "torch", 0.01), ("flax", 0.99, "onnx", 0.99),
    ("onnx", 0.9, "torch", 0.1), ("torch", 0.003, "flax", 0.997),
])
def test_classic_slip_momentum_is_flipped(src, m, dst, expected):
    st = convert_state(SAMPLES["torch"], "torch", src)
    part = "attributes" if src == "onnx" else "config"
    st[part]["momentum"] = m
    out = convert_state(st, src, dst)
    got = out["attributes" if dst == "onnx" else "config"]["momentum"]
    assert got == expected  # exact, not approximately: 0.9 -> 0.1, never 0.09999999999999998
    assert convert_state(out, dst, src)[part]["momentum"] == m


@pytest.mark.parametrize("fw,names", [
    ("keras", ["gamma", "beta", "moving_mean", "moving_variance"]),
    ("onnx", ["scale", "B", "input_mean", "input_var"]),
])
def test_classic_slip_swapped_positional_list_is_rejected(fw, names):
    sample = convert_state(SAMPLES["torch"], "torch", fw, positional=True)
    wkey = "weights" if fw == "keras" else "initializers"
    assert_same(sample[wkey], [GAMMA, BETA, MEAN, VAR])  # the documented order
    assert MEAN.min() < 0
    swapped = dict(sample, **{wkey: [GAMMA, BETA, VAR, MEAN]})
    with pytest.raises(ValueError, match="swapped"):
        convert_state(swapped, fw, "torch")
    named = convert_state(sample, fw, fw)  # the list reads back as the named weights
    assert list(named[wkey]) == names


def test_keras_positional_list_needs_flags_when_ambiguous():
    three = {"weights": [GAMMA, MEAN, VAR], "config": {"momentum": 0.99, "epsilon": 1e-3}}
    with pytest.raises(ValueError, match="ambiguous"):
        convert_state(three, "keras", "torch")
    three["config"].update(center=False, scale=True)
    out = convert_state(three, "keras", "torch")
    assert (out["config"]["affine"], out["config"]["bias"]) == (True, False)
    np.testing.assert_array_equal(out["state_dict"]["weight"], GAMMA)
    three["config"]["center"] = True  # says 4 arrays, 3 given
    with pytest.raises(ValueError, match="expected 4 arrays"):
        convert_state(three, "keras", "torch")


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s["state_dict"].update(running_var=np.array([1.0, np.nan, 1.0, 1.0])), "NaN"),
    (lambda s: s["state_dict"].update(running_mean=np.zeros(3)), "disagree"),
    (lambda s: s["state_dict"].update(gamma=GAMMA), "unexpected"),
    (lambda s: s["state_dict"].update(weight=np.ones((2, 2))), "1-D"),
    (lambda s: s["config"].update(affine=False), "affine"),
    # running statistics come in pairs: one without the other is no layer any framework has
    (lambda s: s["state_dict"].pop("running_var"), "both running_mean and running_var, or neither"),
    (lambda s: s["state_dict"].pop("running_mean"), "both running_mean and running_var, or neither"),
    (lambda s: s["config"].update(momentum=1.5), r"\[0, 1\]"),
    (lambda s: s["config"].update(eps=-1.0), "eps"),
    # a count of updates: 2.5 was rounded to 2, -3 and "5" passed, NaN gave a bare "cannot convert float NaN"
    *[(lambda s, v=v: s["state_dict"].update(num_batches_tracked=v), rf"one non-negative integer .*got {shown}")
      for v, shown in ((2.5, "2.5"), (-3, "-3"), ("5", "'5'"), (np.nan, "nan"), (np.array([3, 4]), r"2 values"))],
    # "3" was compared with the arrays' 3 channels and reported as a mismatch of 3 with 3
    *[(lambda s, v=v: s["config"].update(num_features=v), rf"num_features must be a positive integer, got {shown}")
      for v, shown in (("3", "'3'"), (0, "0"), (-2, "-2"), (True, "True"), (4.0, "4.0"))],
    # the config contradicting the state dict: which one holds is a guess, so neither is taken
    (lambda s: s["state_dict"].pop("weight"), "'bias' without 'weight'"),  # affine=True names the lesser problem
    (lambda s: s["config"].update(bias=False), "says bias=False but the weights have it"),
    (lambda s: s["config"].update(track_running_stats=False), "says track_running_stats=False"),
    (lambda s: s["config"].update(num_features=5), "num_features=5 but the arrays have 4 channels"),
    # no channel at all, and integers (a count or an index array passed by mistake) are no per-channel statistics
    (lambda s: s["state_dict"].update({k: np.zeros(0, np.float32) for k in ("weight", "bias", "running_mean",
                                                                         "running_var")}), "non-empty 1-D"),
    (lambda s: s["state_dict"].update(running_mean=np.arange(C)), "running_mean must be floating point"),
])
def test_bad_input_is_rejected(mutate, match):
    st = {"state_dict": dict(SAMPLES["torch"]["state_dict"]), "config": dict(SAMPLES["torch"]["config"])}
    mutate(st)
    with pytest.raises(ValueError, match=match):
        convert_state(st, "torch", "keras")


@pytest.mark.parametrize("flag,param", [("use_scale", "scale"), ("use_bias", "bias")])
def test_a_flax_config_contradicting_its_params_is_refused(flag, param):
    # use_scale=False beside a 'scale' param: which one holds is a guess, so neither is taken
    st = {**SAMPLES["flax"], "config": {**SAMPLES["flax"]["config"], flag: False}}
    with pytest.raises(ValueError, match=flag):
        convert_state(st, "flax", "torch")


@pytest.mark.parametrize("weights,config,match", [
    # beta present but center=False: the stated flag and the weights disagree
    ({"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN, "moving_variance": VAR}, {"center": False},
     "says center=False but the weights have it"),
    # a stated center is taken, only the unstated scale guessed (True for 4 arrays): 3 arrays expected, not 4
    ([GAMMA, BETA, MEAN, VAR], {"center": False, "scale": None}, "expected 3 arrays"),
    ({"gamma": GAMMA, "beta": BETA}, {}, "must include 'moving_mean' and 'moving_variance'"),
])
def test_a_keras_config_contradicting_its_weights_is_refused(weights, config, match):
    cfg = {k: v for k, v in {**SAMPLES["keras"]["config"], **config}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        convert_state({"weights": weights, "config": cfg}, "keras", "torch")


def test_a_config_without_axis_gets_the_frameworks_own_default():
    """Keras and Flax both default to axis=-1 (channels-last); reading a missing axis as 1 would make the converted
    layer normalize another axis, silently. The oracle is each framework's own default."""
    keras = pytest.importorskip("keras")
    linen = pytest.importorskip("flax.linen")
    for src, dst, default in (("keras", "flax", keras.layers.BatchNormalization().get_config()["axis"]),
                              ("flax", "keras", linen.BatchNorm().axis)):
        cfg = {k: v for k, v in SAMPLES[src]["config"].items() if k != "axis"}
        assert convert_state(dict(SAMPLES[src], config=cfg), src, dst)["config"]["axis"] == default == -1


def test_flax_variables_have_the_collections_module_init_makes():
    """A Flax BatchNorm without scale and bias has no 'params' collection at all (module.init makes none); an empty
    one changes the variables' tree structure, which jax transformations and checkpoints compare."""
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    x = RNG.normal(size=(5, C)).astype(np.float32)
    for affine in (False, True):
        sd = {"running_mean": MEAN, "running_var": VAR, **({"weight": GAMMA, "bias": BETA} if affine else {})}
        out = convert_state({"state_dict": sd, "config": {"eps": 1e-3, "momentum": 0.1}}, "torch", "flax", axis=-1)
        cfg = out["config"]
        module = linen.BatchNorm(use_running_average=True, **cfg)
        init = module.init(jax.random.PRNGKey(0), x)
        assert jax.tree_util.tree_structure(out["variables"]) == jax.tree_util.tree_structure(init)
        gamma, beta = (GAMMA, BETA) if affine else (1.0, 0.0)
        expected = gamma * (x.astype(np.float64) - MEAN) / np.sqrt(VAR.astype(np.float64) + 1e-3) + beta
        np.testing.assert_allclose(np.asarray(module.apply(out["variables"], x)), expected, rtol=1e-5, atol=1e-5)


def test_the_result_never_shares_memory_with_the_input():
    """The arrays are copied: editing a converted layer in place must not change the source layer (a torch tensor's
    .numpy() and np.asarray of an array share memory)."""
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm1d(C)
    for state in (SAMPLES["torch"], {"state_dict": bn.state_dict(), "config": {"eps": 1e-5, "momentum": 0.1}}):
        for dst in FRAMEWORKS:
            out = convert_state(state, "torch", dst)
            got = out.get("state_dict") or out.get("weights") or out.get("initializers") or out["variables"]
            leaves = [a for v in got.values() for a in (v.values() if isinstance(v, dict) else [v])]
            sources = [np.asarray(v) if not hasattr(v, "numpy") else v.numpy() for v in state["state_dict"].values()]
            assert not any(np.shares_memory(a, b) for a in leaves for b in sources), dst


def test_zero_eps_is_a_legal_layer_and_converts():
    """eps=0 is allowed by every framework (torch and Keras take it; the division only fails for a zero variance)."""
    st = {"state_dict": {"running_mean": MEAN, "running_var": VAR}, "config": {"eps": 0.0, "momentum": 0.1}}
    assert convert_state(st, "torch", "keras")["config"]["epsilon"] == 0.0
    assert convert_state(st, "torch", "onnx")["attributes"]["epsilon"] == 0.0


def test_layers_the_target_cannot_express_are_refused():
    none_m = {"state_dict": {"running_mean": MEAN, "running_var": VAR}, "config": {"eps": 1e-5, "momentum": None}}
    with pytest.raises(ValueError, match="cumulative"):
        convert_state(none_m, "torch", "keras")
    assert convert_state(none_m, "torch", "torch")["config"]["momentum"] is None
    no_stats = {"state_dict": {}, "config": {"num_features": C, "eps": 1e-5, "momentum": 0.1, "affine": False}}
    for dst in ("keras", "flax", "onnx"):
        with pytest.raises(ValueError, match="track_running_stats=False"):
            convert_state(no_stats, "torch", dst)
    assert convert_state(no_stats, "torch", "torch")["config"]["track_running_stats"] is False
    renorm = dict(SAMPLES["keras"], config=dict(SAMPLES["keras"]["config"], renorm=True))
    with pytest.raises(ValueError, match="renorm"):
        convert_state(renorm, "keras", "torch")
    with pytest.raises(ValueError, match="no axis"):
        convert_state(SAMPLES["keras"], "keras", "torch", axis=-1)
    for dst in ("torch", "flax"):  # named weights only: a list would be silently mis-ordered by the caller
        with pytest.raises(ValueError, match="positional"):
            convert_state(SAMPLES["keras"], "keras", dst, positional=True)
    with pytest.raises(ValueError, match="unknown convention"):
        convert_state(SAMPLES["keras"], "keras", "caffe")


# ----------------------------------------------------------------- ONNX, run in onnxruntime
def _run_onnx_node(initializers, attributes, x, training):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    names = ["scale", "B", "input_mean", "input_var"]
    inits = [numpy_helper.from_array(np.asarray(initializers[n], np.float32), n) for n in names]
    outputs = ["Y", "running_mean", "running_var"] if training else ["Y"]
    node = helper.make_node("BatchNormalization", ["X", *names], outputs, training_mode=int(training), **attributes)
    shape = [None, *x.shape[1:]]
    c = x.shape[1]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)]
    outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [c]) for n in outputs[1:]]
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x.astype(np.float32)})


def test_torch_layer_to_onnx_node_in_onnxruntime():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(C, eps=1e-3, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    for _ in range(3):
        bn(torch.randn(8, C, 5, 5) * 2 + 1)
    state = {"state_dict": bn.state_dict(), "config": {"eps": bn.eps, "momentum": bn.momentum}}
    onnx_state = convert_state(state, "torch", "onnx")
    assert onnx_state["attributes"] == {"epsilon": 1e-3, "momentum": 0.7}
    x = torch.randn(6, C, 5, 5) * 2 + 1
    (y,) = _run_onnx_node(onnx_state["initializers"], onnx_state["attributes"], x.numpy(), training=False)
    np.testing.assert_allclose(y, bn.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)

    # One training step in onnxruntime moves the running mean exactly as torch does with the flipped momentum;
    # the running variance differs by torch's unbiased n/(n-1) only.
    xb = torch.randn(8, C, 5, 5) * 3 - 1
    _, run_mean, run_var = _run_onnx_node(onnx_state["initializers"], onnx_state["attributes"], xb.numpy(), True)
    var_before = bn.running_var.clone()
    bn.train()(xb)
    np.testing.assert_allclose(run_mean, bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    n = xb.numel() // C
    torch_update = bn.running_var.numpy() - 0.7 * var_before.numpy()
    np.testing.assert_allclose(run_var - 0.7 * var_before.numpy(), torch_update * (n - 1) / n, rtol=1e-4, atol=1e-6)


def test_keras_state_without_center_scale_to_onnx_in_onnxruntime():
    keras = {"weights": [MEAN, VAR], "config": {"axis": -1, "momentum": 0.99, "epsilon": 0.01,
                                                "center": False, "scale": False}}
    onnx_state = convert_state(keras, "keras", "onnx", positional=True)
    scale, b, mean, var = onnx_state["initializers"]
    np.testing.assert_array_equal(scale, np.ones(C))
    np.testing.assert_array_equal(b, np.zeros(C))
    assert scale.dtype == b.dtype == MEAN.dtype == np.float32  # filled in the layer's dtype, never cast to float64
    x_last = RNG.normal(size=(3, 6, C)).astype(np.float32)  # channels-last, as Keras sees it
    (y,) = _run_onnx_node(dict(zip(["scale", "B", "input_mean", "input_var"], onnx_state["initializers"])),
                          onnx_state["attributes"], np.moveaxis(x_last, -1, 1), training=False)
    expected = (x_last.astype(np.float64) - MEAN) / np.sqrt(VAR.astype(np.float64) + 0.01)  # Keras's formula
    np.testing.assert_allclose(np.moveaxis(y, 1, -1), expected, rtol=1e-5, atol=1e-5)


def test_flax_variables_of_the_wrong_shape_say_what_is_expected():
    flax = SAMPLES["flax"]
    for part in ("params", "batch_stats"):
        with pytest.raises(ValueError, match=r"at its top level.*not variables\['params'\]"):
            convert_state(dict(flax, variables=flax["variables"][part]), "flax", "torch")
    with pytest.raises(ValueError, match="whole variables mapping.*got NoneType"):
        convert_state(dict(flax, variables=None), "flax", "torch")
    with pytest.raises(ValueError, match=r"variables\['batch_stats'\] must be a mapping, got list"):
        convert_state(dict(flax, variables={"batch_stats": [MEAN, VAR]}), "flax", "torch")


@pytest.mark.parametrize("src,part,bad,message", [
    ("torch", "state_dict", None, "torch state_dict must be a mapping"),
    ("torch", "state_dict", [MEAN, VAR], "torch state_dict must be a mapping"),
    ("keras", "weights", None, "keras weights must be a mapping .* or a list of arrays, got NoneType"),
    ("onnx", "initializers", 5, "onnx initializers must be a mapping .* or a list of arrays, got int"),
    ("onnx", "initializers", "abcd", "onnx initializers must be a mapping .* or a list of arrays, got str"),
])
def test_weights_that_are_neither_a_mapping_nor_a_list_are_a_value_error_that_says_so(src, part, bad, message):
    """Before: TypeError from len() or iteration (a str of four letters read as four arrays), not the documented
    ValueError for missing weights."""
    with pytest.raises(ValueError, match=message):
        convert_state(dict(SAMPLES[src], **{part: bad}), src, "flax")


@pytest.mark.parametrize("src,part", [("onnx", "initializers"), ("keras", "weights")])
def test_positional_weights_stacked_in_one_torch_tensor_still_convert(src, part):
    """Review: the check above first refused a (4, C) torch tensor, which converted before as the same NumPy array
    does. Oracle: the conversion of the NumPy array."""
    torch = pytest.importorskip("torch")
    stacked = np.stack([np.asarray(a, dtype=np.float32) for a in SAMPLES[src][part].values()])  # the layout's order
    expected = convert_state(dict(SAMPLES[src], **{part: stacked}), src, "torch")
    got = convert_state(dict(SAMPLES[src], **{part: torch.from_numpy(stacked)}), src, "torch")
    for key, value in expected["state_dict"].items():
        np.testing.assert_array_equal(np.asarray(got["state_dict"][key]), np.asarray(value))


def test_torch_tensors_keep_their_dtype_and_bfloat16_becomes_float32_exactly():
    torch = pytest.importorskip("torch")
    config = {"eps": 1e-5, "momentum": 0.1}
    for dtype, expected in ((torch.float32, np.float32), (torch.float16, np.float16), (torch.float64, np.float64),
                            (torch.bfloat16, np.float32)):
        bn = torch.nn.BatchNorm1d(C, dtype=dtype)
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(MEAN))
        out = convert_state({"state_dict": bn.state_dict(), "config": config}, "torch", "keras")["weights"]
        assert out["moving_mean"].dtype == expected, dtype
        np.testing.assert_array_equal(out["moving_mean"], bn.running_mean.double().numpy())  # every value kept


def test_a_torch_tensor_of_a_dtype_numpy_lacks_is_refused_naming_it():
    """A float8 torch layer escaped as torch's bare "Got unsupported ScalarType" TypeError, where the same values
    as NumPy arrays got a named refusal."""
    torch = pytest.importorskip("torch")
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in torch.nn.BatchNorm1d(C).state_dict().items()
          if k != "num_batches_tracked"}
    with pytest.raises(ValueError, match="weight has dtype torch.float8_e4m3fn, which NumPy lacks"):
        convert_state({"state_dict": sd, "config": {"eps": 1e-5, "momentum": 0.1}}, "torch", "keras")


def test_momentum_none_or_not_a_number_is_reported_against_the_source():
    keras = SAMPLES["keras"]
    with pytest.raises(ValueError, match="keras momentum must be a number in .*got None"):
        convert_state(dict(keras, config=dict(keras["config"], momentum=None)), "keras", "onnx")
    with pytest.raises(ValueError, match="onnx momentum must be a real number, got 'fast'"):
        convert_state(dict(SAMPLES["onnx"], attributes={"epsilon": 1e-5, "momentum": "fast"}), "onnx", "torch")


@pytest.mark.parametrize("channels", [0, -2])
def test_a_layer_without_arrays_needs_a_positive_channel_count(channels):
    """Nothing else gives the count away: 0 and -2 passed through to the output config."""
    bare = {"state_dict": {}, "config": {"num_features": channels, "eps": 1e-5, "momentum": 0.1, "affine": False,
                                         "track_running_stats": False}}
    with pytest.raises(ValueError, match=f"num_features must be a positive integer, got {channels}"):
        convert_state(bare, "torch", "keras")
    bare["config"]["num_features"] = 3
    assert convert_state(bare, "torch", "torch")["config"]["num_features"] == 3


@pytest.mark.parametrize("dst", ["keras", "flax"])
def test_axis_0_is_refused_as_the_batch_axis(dst):
    """Before: convert_state(..., axis=0) wrote a Keras/Flax layer normalizing over the batch axis."""
    with pytest.raises(ValueError, match="batch axis"):
        convert_state(SAMPLES["torch"], "torch", dst, axis=0)
    assert convert_state(SAMPLES["torch"], "torch", dst, axis=-1)["config"]["axis"] == -1


@pytest.mark.parametrize("src", ["keras", "flax"])
def test_a_layer_over_several_axes_is_refused_as_such(src):
    """Keras/Flax normalize over several axes with axis=(1, 2); their arrays are then 2-D, and the complaint was
    about the arrays' shape, not the axes."""
    sample = SAMPLES[src]
    two_d = {k: np.stack([v, v]) for k, v in sample["weights"].items()} if src == "keras" else {
        part: {k: np.stack([v, v]) for k, v in arrays.items()} for part, arrays in sample["variables"].items()}
    key = "weights" if src == "keras" else "variables"
    bad = dict(sample, config=dict(sample["config"], axis=(1, 2)), **{key: two_d})
    with pytest.raises(ValueError, match=rf"{src} axis \(1, 2\): only a single channel axis can be converted"):
        convert_state(bad, src, "torch")


@pytest.mark.parametrize("dst", ["keras", "flax"])
@pytest.mark.parametrize("axis", [1.9, -0.5, True, "1"])
def test_an_axis_that_is_not_an_integer_is_refused_naming_it(dst, axis):
    """1.9 became axis 1, -0.5 was called 'axis=0 ... the batch axis', True became 1: refused as what it is. A
    source config's axis likewise; a NumPy integer is an integer."""
    with pytest.raises(ValueError, match=rf"axis must be an integer, got {re.escape(repr(axis))}"):
        convert_state(SAMPLES["torch"], "torch", dst, axis=axis)
    src = {"keras": "flax", "flax": "keras"}[dst]
    bad = dict(SAMPLES[src], config=dict(SAMPLES[src]["config"], axis=axis))
    with pytest.raises(ValueError, match=rf"{src} axis must be an integer, got {re.escape(repr(axis))}"):
        convert_state(bad, src, "torch")
    assert convert_state(SAMPLES["torch"], "torch", dst, axis=np.int64(-1))["config"]["axis"] == -1
