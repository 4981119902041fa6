"""Host side: torch, timm and onnx live only in this package (scoring, masking, the step graph, export, apply)."""

import logging

# torch logs "No CUDA runtime is found" at import on CPU-only machines: noise for a CLI user.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
