"""torch -> ONNX for our static-shape graphs (their I/O is read back by runtime/graph_io.py)."""

from __future__ import annotations


import warnings
from pathlib import Path

import onnx
import torch

# Protobuf cannot serialise a model over 2 GB; such graphs keep weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 2**24


def export_module(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  path: Path, opset: int, dynamic: tuple[dict[int, str], ...] | None = None) -> None:
    """Export with the dynamo exporter (torch >= 2.9 has no other maintained path).

    The program is saved straight from its in-memory IR, which references the
    torch weights: building a ModelProto first would hold a second full copy
    (7.7 GB for the 2B backbone) and cannot exceed protobuf's 2 GB anyway. The
    exporter moves the weights to ``<file>.data`` past 2 GB.
    ``dynamic`` gives, per input, the axes left symbolic ({axis: name}).
    """
    module.eval()
    path = Path(path)
    shapes = None if dynamic is None else tuple(
        {axis: torch.export.Dim(name) for axis, name in axes.items()} or None for axes in dynamic)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=shapes,
            optimize=True, verify=False, report=False,
        )
        program.save(str(path))
    del program
    onnx.checker.check_model(str(path))  # by path: works for models with external data


def external_data_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".data")


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, moving weights to ``<file>.data`` when the graph is too big for one protobuf."""
    path = Path(path)
    external_data_path(path).unlink(missing_ok=True)
    if _initializer_bytes(model) > _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_path(path).name, size_threshold=1024)
        external_data_path(path).chmod(path.stat().st_mode & 0o777)  # onnx creates it private
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))


def _initializer_bytes(model: onnx.ModelProto) -> int:
    """Weight bytes, summed per tensor: ModelProto.ByteSize() itself fails past 2 GB."""
    return sum(t.ByteSize() for t in model.graph.initializer)
