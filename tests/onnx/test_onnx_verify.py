"""bnkit.onnx.verify: the comparison and tolerance every fold/export check relies on, against closed-form values;
the random inputs it makes for a check take a dim_value of -1 as dynamic and refuse 0 (empty), as onnxruntime does."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from _helpers import conv_bn_model, ort_run, rel
from onnx import TensorProto, helper, numpy_helper

from bnkit.onnx import fold_model
from bnkit.onnx.verify import compare, default_tolerance, random_inputs

REF = np.array([1.0, 2.0, 3.0])
NAN = float("nan")


def test_compare_gives_the_largest_absolute_and_norm_wise_relative_difference():
    # two outputs: |diff| 0.5 against max|ref| 3, and |diff| 4 against max|ref| 400
    abs_diff, rel_diff = compare([REF, 100 * REF + 100], [REF + [0, 0.5, 0], 100 * REF + [100, 100, 104]])
    assert abs_diff == pytest.approx(4.0) and rel_diff == pytest.approx(0.5 / 3)


@pytest.mark.parametrize("reference, candidate", [
    (REF, [1.0, NAN, 3.0]),            # a fold whose output turned NaN must not verify
    (REF, [1.0, float("inf"), 3.0]),
    ([NAN, 2.0, 3.0], [1.0, NAN, 3.0]),  # NaN in both, at different places
    ([NAN, 2.0, 3.0], [float("inf"), 2.0, 3.0]),
])
def test_non_finite_values_that_do_not_match_exactly_are_an_infinite_difference(reference, candidate):
    assert compare([np.array(reference)], [np.array(candidate)]) == (float("inf"), float("inf"))


def test_non_finite_values_at_the_same_places_are_skipped_and_the_rest_compared():
    assert compare([np.array([NAN, 2.0, 4.0])], [np.array([NAN, 2.0, 5.0])]) == pytest.approx((1.0, 0.25))


def test_an_all_zero_reference_is_matched_only_by_zeros():
    # max|ref| = 0: any difference is infinitely large relative to it, none is 0
    assert compare([np.zeros(3)], [np.full(3, 1e-3)]) == (pytest.approx(1e-3), float("inf"))
    assert compare([np.zeros(3)], [np.zeros(3)]) == (0.0, 0.0)


@pytest.mark.parametrize("reference, candidate", [
    ([REF.reshape(3, 1)], [REF.reshape(1, 3)]),  # same size and rank, would broadcast to (3, 3)
    ([REF], [REF[:2]]),
    ([REF, 100 * REF], [REF]),                   # an output missing: the first alone agrees
    ([REF], [REF, REF]),
])
def test_outputs_differing_in_number_or_shape_are_refused(reference, candidate):
    with pytest.raises(ValueError, match="outputs|shapes differ"):
        compare(reference, candidate)


def _cast_conv(weight_dtype: int):
    """Conv whose weight is an initializer of ``weight_dtype`` Cast to float32, between float32 input and output
    (what mixed-precision converters write: fp16 storage, computed in fp32 after the Cast)."""
    w = numpy_helper.from_array(np.ones((4, 8, 1, 1), helper.tensor_dtype_to_np_dtype(weight_dtype)), "W16")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT), helper.make_node("Conv", ["x", "W"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], [w])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("weight_dtype, tolerance", [(TensorProto.FLOAT16, 1e-2), (TensorProto.FLOAT, 1e-4)])
def test_low_precision_initializers_set_the_tolerance_even_when_cast_up(weight_dtype, tolerance):
    # fp16 weights are rounded to fp16 once stored; only the initializer's dtype shows it (every value is float32)
    assert default_tolerance(_cast_conv(weight_dtype)) == tolerance


def test_random_inputs_refuse_a_shape_for_an_input_the_graph_does_not_have():
    # a typo (--input-shape imput=64x4) must not silently verify on the default shape instead
    model = _cast_conv(TensorProto.FLOAT)
    assert random_inputs(model, input_shapes={"x": [1, 8, 2, 2]})["x"].shape == (1, 8, 2, 2)
    with pytest.raises(ValueError, match=r"names no graph input.*imput.*the graph's inputs are \['x'\]"):
        random_inputs(model, input_shapes={"x": [1, 8, 2, 2], "imput": [1, 8, 2, 2]})


def test_inputs_short_of_memory_are_told_apart_from_the_model(monkeypatch):
    """NumPy failing to allocate a random input is a VerificationMemoryError naming the input (the CLI then suggests a
    smaller --input-shape); a MemoryError from the model's own tensors is not one (tests/cli/test_cli_fold.py)."""
    from bnkit.onnx.verify import VerificationMemoryError

    class Short:
        def standard_normal(self, shape):
            raise MemoryError(f"Unable to allocate 1 TiB for an array with shape {shape}")

    monkeypatch.setattr(np.random, "default_rng", lambda seed=None: Short())
    with pytest.raises(VerificationMemoryError, match=r"input 'x' of shape \[1, 8, 2, 2\]: Unable to allocate 1 TiB"):
        random_inputs(_cast_conv(TensorProto.FLOAT), input_shapes={"x": [1, 8, 2, 2]})


def test_outputs_short_of_memory_in_the_check_are_a_verification_memory_error(monkeypatch):
    """compare's float64 copies of large outputs failing to allocate: the CLI said 'not enough memory to fold', though
    the fold itself fitted (--no-verify ran); the check's memory is the verification's, which smaller shapes help."""
    import sys

    from bnkit.onnx.verify import VerificationMemoryError

    onnx_fold = sys.modules["bnkit.onnx.fold"]  # the module: bnkit.onnx.fold the attribute is the function

    def short(*args):
        raise MemoryError("Unable to allocate 2.00 GiB for an array with shape (1, 64, 2048, 2048)")

    monkeypatch.setattr(onnx_fold, "compare", short)
    with pytest.raises(VerificationMemoryError, match=r"the outputs on inputs of shapes \{'x': \[1, 8, 2, 2\]\}: "
                                                      r"Unable to allocate 2.00 GiB"):
        fold_model(_cast_conv(TensorProto.FLOAT), input_shapes={"x": [1, 8, 2, 2]})


def test_a_cast_type_passed_through_two_functions_counts_for_the_tolerance():
    """Outer(to=FLOAT16 by default) calls Inner(t=@to), whose Cast takes 'to' from t: the inliner drops that 'to', and
    the fallback counted the call's reference as the value 0. Oracle: the closed form, the graph casts to fp16."""
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    cast = helper.make_node("Cast", ["x"], ["a"])
    cast.attribute.append(_ref("to", "t"))
    inner = helper.make_function("local", "Inner", ["x"], ["y"], [cast, helper.make_node("Cast", ["a"], ["y"],
                                                                                          to=TensorProto.FLOAT)],
                                 ops, attributes=["t"])
    call = helper.make_node("Inner", ["x"], ["y"], domain="local")
    call.attribute.append(_ref("t", "to"))
    outer = helper.make_function("local", "Outer", ["x"], ["y"], [call], ops,
                                 attribute_protos=[helper.make_attribute("to", TensorProto.FLOAT16)])
    graph = helper.make_graph([helper.make_node("Outer", ["X"], ["Y"], domain="local")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=ops, functions=[inner, outer])
    model.ir_version = 9
    onnx.checker.check_model(model)
    assert default_tolerance(model) == 1e-2


def _ref(name: str, to: str) -> onnx.AttributeProto:
    """Attribute ``name`` of a node in a function body, taking the function's attribute ``to``."""
    attr = onnx.AttributeProto()
    attr.name, attr.ref_attr_name, attr.type = name, to, onnx.AttributeProto.INT
    return attr


def test_dim_value_minus_one_is_dynamic_and_zero_is_still_empty():
    from bnkit.onnx.verify import random_inputs

    model = conv_bn_model(-1)
    onnx.checker.check_model(model, full_check=True)
    x5 = np.random.default_rng(1).standard_normal((5, 2, 6, 6)).astype(np.float32)
    original = ort_run(model, {"x": x5})[0]  # onnxruntime takes -1 as dynamic
    assert random_inputs(model, dynamic_size=3)["x"].shape == (3, 2, 6, 6)

    folded, report = fold_model(model)
    assert report.verified and report.input_shapes == {"x": [2, 2, 6, 6]}
    assert rel(ort_run(folded, {"x": x5})[0], original) < 1e-5
    _, report = fold_model(model, input_shapes={"x": [3, 2, 6, 6]})
    assert report.verified and report.input_shapes == {"x": [3, 2, 6, 6]}

    empty = conv_bn_model(0)
    with pytest.raises(ValueError, match="empty"):
        random_inputs(empty)
    with pytest.raises(ValueError, match="empty"):
        fold_model(empty)


def test_maps_strings_and_ragged_sequences_are_compared_by_their_numbers_and_exactly_otherwise():
    """ZipMap's sequence of maps, a string label output and a sequence of tensors of other shapes crashed the
    comparison (TypeError from float(dict)) or were refused as unverifiable (review). Oracle: the numbers by hand."""
    maps = [{0: 0.25, 1: 0.75}, {0: 0.5, 1: 0.5}]
    moved = [{0: 0.25, 1: 0.75}, {0: 0.5, 1: 0.625}]
    labels = np.array(["cat", "dog"], dtype=object)
    ragged = [np.ones((1, 2)), np.full((2, 2), 4.0)]
    assert compare([maps, labels, ragged], [moved, labels.copy(), ragged]) == pytest.approx(
        (0.125, 0.125 / 0.75))
    for other in ([{0: 0.25, 2: 0.75}, {0: 0.5, 1: 0.5}], [{0: 0.25, 1: 0.75}]):  # other keys, another length
        with pytest.raises(ValueError, match="differs in what it holds beside numbers"):
            compare([maps], [other])
    with pytest.raises(ValueError, match="differs in what it holds beside numbers"):
        compare([labels], [np.array(["cat", "eel"], dtype=object)])
    with pytest.raises(ValueError, match="differs in what it holds beside numbers"):
        compare([ragged], [[np.ones((2, 1)), np.full((2, 2), 4.0)]])


def test_a_fold_before_zipmap_is_verified():
    """Gemm -> BatchNormalization -> ai.onnx.ml ZipMap, a classifier's probability map: bnkit fold ended in a
    TypeError traceback (review). Oracle: onnxruntime on the original and the folded graph."""
    rng = np.random.default_rng(0)
    scale, bias = rng.uniform(0.5, 2, 2).astype(np.float32), rng.normal(size=2).astype(np.float32)
    mean, var = rng.normal(size=2).astype(np.float32), rng.uniform(0.5, 2, 2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=1),
         helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["y"]),
         helper.make_node("ZipMap", ["y"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]),
         helper.make_value_info("probs", helper.make_sequence_type_proto(helper.make_map_type_proto(
             TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))],
        [numpy_helper.from_array(a, n) for a, n in ((rng.normal(size=(2, 4)).astype(np.float32), "W"),
                                                     (rng.normal(size=2).astype(np.float32), "C"), (scale, "s"),
                                                     (bias, "b"), (mean, "m"), (var, "v"))])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13),
                                                                  helper.make_opsetid("ai.onnx.ml", 1)])
    folded, report = fold_model(model)
    assert len(report.folded) == 1 and report.max_rel_diff < 1e-5
    x = rng.normal(size=(3, 4)).astype(np.float32)
    (want, want_maps), (got, got_maps) = ort_run(model, {"x": x}), ort_run(folded, {"x": x})
    assert rel(got, want) < 1e-6
    assert [sorted(d) for d in got_maps] == [sorted(d) for d in want_maps] == [[0, 1]] * 3


def test_a_string_output_beside_integer_ones_counts_the_integers():
    """A string output has no numbers: its empty part was float64, so it alone counted as the floating output and
    the integer ones beside it compared nothing ('every output value is NaN or Inf', review). Oracle: the integer
    outputs by hand."""
    labels, index = np.array(["cat", "dog"], dtype=object), np.array([1, 2])
    assert compare([labels, index], [labels.copy(), index + [0, 3]]) == (3.0, 1.5)


def test_low_precision_arrays_and_a_list_beside_an_array_compare_by_value():
    """ml_dtypes' bfloat16/float8 arrays (NumPy kind 'V') were taken for strings, and a plain list of numbers
    against an array for another structure (review). Oracle: the same values in float64."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    f8 = ml_dtypes.float8_e4m3fn
    assert compare([np.array([1.0, 2.0], f8)], [np.array([1.0, 2.25], f8)]) == (0.25, 0.125)
    bf16 = np.array([1.0, 2.0, 4.0], ml_dtypes.bfloat16)
    assert compare([bf16], [bf16 * 2]) == (4.0, 1.0)
    assert compare([np.array([1.0, 2.0])], [[1.0, 2.5]]) == (0.5, 0.25)
    assert compare([[1.0, 2.0]], [np.array([1.0, 2.5])]) == (0.5, 0.25)
