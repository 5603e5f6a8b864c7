"""smearsight.export: ONNX export, parity and FP16-safety checks, TensorRT FP16 engines, manifests."""
