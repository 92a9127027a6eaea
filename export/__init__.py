"""Graph wrappers, ONNX export, TensorRT engine build and Polygraphy validation."""
