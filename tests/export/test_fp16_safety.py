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
