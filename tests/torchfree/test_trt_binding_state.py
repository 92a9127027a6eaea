"""TrtBinding's buffer bookkeeping for a state graph with a stream axis, on a simulated device.

No GPU is lent here and TensorRT cannot be installed, so this checks only what is ours: which
device buffer each run reads and writes, the swap of the two state sets, set_dims shrinking and
growing the stream axis, reset_state of one row. The "device" is host memory behind a stand-in
for the few cuda-python calls the binding makes, and the "engine" a numpy function of the
addresses the binding points it at (``next = where(active, state + codes, state)``, pcm = next).
No TensorRT result is claimed: the real engine is tested by tests/test_tensorrt.py on a GPU.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np

from dia2_trt.runtime.manifest import GraphSpec, StatePair, TensorSpec
from dia2_trt.runtime.tensorrt import TrtBinding

STREAMS, WIDTH = 4, 3
OK = 0


class _Memory:
    """cuda-python's runtime module, as far as TrtBinding uses it, over host memory."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)

    def __init__(self) -> None:
        self._blocks: dict[int, ctypes.Array] = {}

    def _alloc(self, nbytes: int):
        block = (ctypes.c_byte * nbytes)()
        ctypes.memset(block, 0x7F, nbytes)  # not zero: a read of memory nobody wrote shows up
        self._blocks[ctypes.addressof(block)] = block
        return OK, ctypes.addressof(block)

    cudaMalloc = cudaMallocHost = _alloc

    def cudaMemcpy(self, dst, src, nbytes, kind):
        ctypes.memmove(int(dst), int(src), nbytes)
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        return self.cudaMemcpy(dst, src, nbytes, kind)

    def cudaMemsetAsync(self, dst, value, nbytes, stream):
        ctypes.memset(int(dst), value, nbytes)
        return (OK,)

    def cudaStreamCreate(self):
        return OK, 1

    def cudaStreamSynchronize(self, stream):
        return (OK,)

    def cudaSetDevice(self, device):
        return (OK,)

    def cudaFree(self, ptr):
        return (OK,)

    cudaFreeHost = cudaStreamDestroy = cudaFree


class _Context:
    """The engine: reads and writes the tensors at the addresses and shapes the binding set."""

    def __init__(self) -> None:
        self.address: dict[str, int] = {}
        self.shape: dict[str, tuple[int, ...]] = {}

    def set_input_shape(self, name, shape):
        self.shape[name] = tuple(shape)

    def set_tensor_address(self, name, address):
        self.address[name] = address

    def _array(self, name, shape, dtype):
        count = int(np.prod(shape))
        raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(self.address[name])
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def execute_async_v3(self, stream):
        s = self.shape["codes"][0]
        codes = self._array("codes", (s, 1), np.float32)
        active = self._array("active", (s,), np.bool_)
        state = self._array("state.x", (s, WIDTH), np.float32)
        new = np.where(active[:, None], state + codes, state)
        self._array("next.x", (s, WIDTH), np.float32)[:] = new
        self._array("pcm", (s, WIDTH), np.float32)[:] = new
        return True


def _binding() -> TrtBinding:
    f32, flag = np.dtype(np.float32), np.dtype(np.bool_)
    spec = GraphSpec(
        "codec_decoder", "codec_decoder.engine", "0" * 64, "fp32",
        inputs=(TensorSpec("codes", ("streams", 1), f32), TensorSpec("active", ("streams",), flag),
                TensorSpec("state.x", ("streams", WIDTH), f32)),
        outputs=(TensorSpec("pcm", ("streams", WIDTH), f32), TensorSpec("next.x", ("streams", WIDTH), f32)),
        state=(StatePair("state.x", "next.x"),), dims={"streams": STREAMS})
    backend = SimpleNamespace(cudart=_Memory(), device=0, cuda_graphs=False)
    graph = SimpleNamespace(spec=spec, backend=backend, engine=SimpleNamespace(create_execution_context=_Context))
    binding = TrtBinding(graph)  # type: ignore[arg-type]
    binding.reset_state()
    return binding


def _step(binding: TrtBinding, s: int, codes: dict[int, float]) -> np.ndarray:
    """One run at S = s; rows in ``codes`` active (adding their code), the others sitting out."""
    binding.set_dims({"streams": s})
    feed = np.zeros((s, 1), np.float32)
    active = np.zeros(s, np.bool_)
    for row, code in codes.items():
        feed[row, 0], active[row] = code, True
    return binding.run({"codes": feed, "active": active})["pcm"].copy()


def test_rows_a_smaller_batch_leaves_out_keep_their_state():
    """Row 2 is left out by an odd number of S = 2 runs, then the batch grows again: it must go on
    from its own last state (without carrying it across the shrink it came back one run stale)."""
    binding = _binding()
    expected = np.zeros(STREAMS)
    for _ in range(3):
        _step(binding, 3, {0: 1.0, 1: 2.0, 2: 4.0})
    expected[:3] = [3.0, 6.0, 12.0]
    _step(binding, 2, {0: 1.0, 1: 2.0})  # one run: the sets have swapped once
    expected[:2] += [1.0, 2.0]
    pcm = _step(binding, 3, {0: 1.0, 1: 2.0, 2: 4.0})
    expected[:3] += [1.0, 2.0, 4.0]
    np.testing.assert_array_equal(pcm[:, 0], expected[:3])
    pcm = _step(binding, 4, {3: 8.0})
    np.testing.assert_array_equal(pcm[:, 0], [*expected[:3], 8.0])


def test_reset_of_one_row_leaves_the_others():
    binding = _binding()
    _step(binding, 3, {0: 1.0, 1: 2.0, 2: 4.0})
    _step(binding, 2, {0: 1.0})
    binding.reset_state(slice(1, 2))
    pcm = _step(binding, 3, {0: 1.0, 1: 5.0, 2: 0.5})
    np.testing.assert_array_equal(pcm[:, 0], [3.0, 5.0, 4.5])
