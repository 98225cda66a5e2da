"""Serving: ONNX Runtime behind a BentoML `/classify` API. Never imports torch."""
