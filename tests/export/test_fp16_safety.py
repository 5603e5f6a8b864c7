"""fp16_overflow_layers: finds the node whose activations leave the float16 range, on a hand-built graph."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from smearsight.export.parity import FP16_MAX, fp16_overflow_layers  # noqa: E402


def _graph(path, gain: float) -> None:
    """x [N,2,4,4] -> Conv 1x1 (weights ``gain``) -> Relu -> Mul by 1/gain -> y: only the middle overflows."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], [gain, 0.0, 0.0, gain])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [1.0 / gain])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["big"], name="amplify"),
        helper.make_node("Relu", ["big"], ["big_relu"], name="relu"),
        helper.make_node("Mul", ["big_relu", "s"], ["y"], name="rescale"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4, 4])], initializer=[weight, scale],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("batch_one", [True, False])
def test_overflowing_intermediate_is_named(tmp_path, batch_one: bool) -> None:
    inputs = np.abs(np.random.default_rng(0).normal(size=(3, 2, 4, 4))).astype(np.float32) + 0.5
    _graph(tmp_path / "hot.onnx", gain=1e5)
    found = dict(fp16_overflow_layers(tmp_path / "hot.onnx", inputs, "x", batch_one))
    assert set(found) == {"amplify", "relu"}  # the output y (rescaled) is back in range
    expected_peak = float(np.max(inputs)) * 1e5
    assert found["amplify"] == pytest.approx(expected_peak, rel=1e-5) and expected_peak > FP16_MAX

    _graph(tmp_path / "cool.onnx", gain=10.0)
    assert fp16_overflow_layers(tmp_path / "cool.onnx", inputs, "x", batch_one) == []


def test_check_runs_in_chunks_with_the_same_results(tmp_path) -> None:
    """Inputs go through ONNX Runtime CHECK_BATCH at a time (memory bounded by one chunk's intermediate
    tensors): outputs equal one whole-batch run of the same session, the peak is found in whichever chunk
    holds it, and a NaN in any chunk is reported."""
    import onnxruntime as ort

    from smearsight.export.parity import CHECK_BATCH, run_onnx, run_onnx_batches

    rng = np.random.default_rng(1)
    inputs = np.abs(rng.normal(size=(2 * CHECK_BATCH + 3, 2, 4, 4))).astype(np.float32) + 0.5
    inputs[CHECK_BATCH + 5, 1, 2, 2] = 9.0  # the peak sits in the second chunk
    _graph(tmp_path / "hot.onnx", gain=1e5)
    runs = list(run_onnx_batches(tmp_path / "hot.onnx", inputs, "x", batch_one=False))
    assert [len(r[0]) for r in runs] == [CHECK_BATCH, CHECK_BATCH, 3]
    session = ort.InferenceSession(str(tmp_path / "hot.onnx"), providers=["CPUExecutionProvider"])
    whole = session.run(None, {"x": inputs})
    np.testing.assert_array_equal(run_onnx(tmp_path / "hot.onnx", inputs, "x", batch_one=False)[0], whole[0])
    found = dict(fp16_overflow_layers(tmp_path / "hot.onnx", inputs, "x", batch_one=False))
    assert found["amplify"] == pytest.approx(9.0e5, rel=1e-6)
    inputs[-1, 0, 0, 0] = np.nan  # last chunk
    _graph(tmp_path / "cool.onnx", gain=10.0)
    found = dict(fp16_overflow_layers(tmp_path / "cool.onnx", inputs, "x", batch_one=False))
    assert found and all(v == np.inf for v in found.values())
