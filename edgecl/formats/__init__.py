"""File formats shared by host, device and server: numpy + stdlib + safetensors (+ Pillow for images).

Nothing here may import torch or onnxruntime: every side imports this package.
"""
