"""ImageFolder -> fine-tuned CNN -> evaluated, verified ONNX model in the BentoML model store."""
