"""PyTorch definition of Dia2 and checkpoint loading (export-time only)."""
