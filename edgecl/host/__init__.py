"""Host side: torch, timm, onnx and onnxruntime.training.artifacts live only in this package."""
