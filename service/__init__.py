"""Serving: ONNX Runtime or OpenVINO behind a BentoML `/classify` API. Never imports torch."""
