"""Torch-free Dia2 runtime: reads an artifact directory (manifest + graphs + tokenizer) and streams speech.

This package must never import torch, nor dia2_trt.models / export / calibration.
"""
