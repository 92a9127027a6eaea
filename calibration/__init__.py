"""INT8/FP8 calibration data and quantization."""
