"""Exporters from this suite's checkpoints to other runtimes' formats (ONNX, ...)."""
