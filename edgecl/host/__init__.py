"""Host side: torch, timm, onnx and onnxruntime.training.artifacts live only in this package."""

import logging

# torch logs "No CUDA runtime is found" at import on CPU-only machines: noise for a CLI user.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
