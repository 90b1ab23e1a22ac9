"""Measuring: the self-contained onnxruntime runner, validation and gates, targets (host, emulated ARM, SSH), reports."""
