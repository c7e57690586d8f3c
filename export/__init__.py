"""Deployment: the purified CLIP as one ONNX graph (export.onnx), ONNX Runtime inference in Python
(export.runtime, export.predict) and C++ (export/cpp)."""
