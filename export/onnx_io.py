"""torch -> ONNX for our static-shape graphs (their I/O is read back by runtime/graph_io.py)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

if TYPE_CHECKING:  # torch is imported where a module is exported, not when this module loads
    import torch

# Graphs with more weight bytes than this keep them in ``<file>.data``. Beyond protobuf's 2 GB cap,
# ONNX Runtime holds an inline graph's protobuf beside the tensors it builds from it: loading the
# 2B int4 depformer (1.07 GB) took 2.22 GiB RSS inline and 1.15 GiB from a side file, the 2B
# codec decoder (228 MB) 0.30 and 0.19 GiB. Smaller graphs (every tiny one) stay one file.
EXTERNAL_DATA_BYTES = 32 << 20
# Axes exported as a multiple of another (torch.export's derived dims): the CFG rows are always twice
# the streams. The exporter names such an axis by its formula ("2*streams"); the graph files name it.
DERIVED_DIMS = {"stream_rows": ("streams", 2)}


def export_module(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  path: Path, opset: int, dynamic: tuple | None = None) -> None:
    """Export with the dynamo exporter (torch >= 2.9 has no other maintained path).

    The program is saved straight from its in-memory IR, which references the
    torch weights: building a ModelProto first would hold a second full copy
    (7.7 GB for the 2B backbone) and cannot exceed protobuf's 2 GB anyway. The
    exporter moves the weights to ``<file>.data`` past EXTERNAL_DATA_BYTES.
    ``dynamic`` gives, per parameter of ``forward``, the axes left symbolic ({axis: name}; a tuple
    of them for a ``*args`` parameter); a DERIVED_DIMS name is that multiple of its base axis.
    """
    import torch

    module.eval()
    path = Path(path)
    dims: dict[str, Any] = {}  # one Dim per name: inputs that share a name share the size

    def dim(name: str):
        if name in DERIVED_DIMS:
            base, factor = DERIVED_DIMS[name]
            return factor * dim(base)
        return dims.setdefault(name, torch.export.Dim(name))

    def spec(axes):  # {axis: name} per input; a tuple of them for a *args parameter
        if isinstance(axes, tuple):
            return tuple(spec(a) for a in axes)
        return {axis: dim(name) for axis, name in axes.items()} or None

    shapes = None if dynamic is None else tuple(spec(axes) for axes in dynamic)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=shapes,
            optimize=True, verify=False, report=False,
        )
        assert program is not None  # dynamo=True returns an ONNXProgram
        program.save(str(path), external_data=module_bytes(module) > EXTERNAL_DATA_BYTES)
    del program
    if dynamic is not None:
        _name_derived_dims(path)
    onnx.checker.check_model(str(path))  # by path: works for models with external data


def _name_derived_dims(path: Path) -> None:
    """"2*streams" -> "stream_rows" on every typed value; the weights (external or not) are rewritten as read."""
    formulas = {f"{factor}*{base}": name for name, (base, factor) in DERIVED_DIMS.items()}
    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for graph in _graphs(model.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            for d in value.type.tensor_type.shape.dim:
                if d.dim_param in formulas:
                    d.dim_param = formulas[d.dim_param]
                    changed = True
    if changed:
        onnx.save_model(model, str(path))


def _graphs(graph: onnx.GraphProto):
    """``graph`` and its subgraphs (If branches, Loop bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def external_data_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".data")


def module_bytes(module) -> int:
    """A torch module's parameter and buffer bytes (what its exported graph's weights come to)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, moving weights to ``<file>.data`` past EXTERNAL_DATA_BYTES."""
    path = Path(path)
    external_data_path(path).unlink(missing_ok=True)
    if _initializer_bytes(model) > EXTERNAL_DATA_BYTES:
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
