"""Deployment: the ONNX export and ONNX Runtime backend, streaming video inference with class presence over
consecutive frames, and packing the bundle into a zip."""
