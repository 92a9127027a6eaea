"""The codec decoder over S streams: each row decodes exactly what its stream decodes alone.

Rows are streams: every op of the graph works per row (per-row RoPE position and sliding
window), and a row with ``active`` False keeps its state. So a stream's pcm is bit-identical on
ONNX Runtime whatever the batch holds, whenever it started and whichever frames it sat out,
and the runtime's batched codec (one decoder call a frame for every stream) gives each session
its solo audio. Artifacts whose decoder has no stream axis (one binding a slot) still run.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from dia2_trt.export.codec import export_codec_decoder  # noqa: E402
from dia2_trt.export.manifest import write_manifest  # noqa: E402
from dia2_trt.models.mimi_stream import make_tiny_mimi  # noqa: E402
from dia2_trt.models.sources import load_mimi, resolve_checkpoint  # noqa: E402
from dia2_trt.runtime import Dia2Runtime, GenerationParams  # noqa: E402
from dia2_trt.runtime.artifacts import load_manifest  # noqa: E402
from dia2_trt.runtime.backends import OrtGraph  # noqa: E402
from dia2_trt.runtime.manifest import CODEC_DECODER, STATE_IN, STATE_OUT  # noqa: E402
from dia2_trt.runtime.step import ACTIVE, STREAMS  # noqa: E402

from torchfree.batch_runs import GREEDY, SCRIPTS, Plan, differences, run_together, solo  # noqa: E402

Q = 8
MAX_STREAMS = 8
# 140 frames = 280 transformer steps: every row crosses the 250-step attention window, at its own call
FRAMES = 140


def session(path, threads: int = 1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mimi():
    return make_tiny_mimi(seed=0, num_quantizers=Q)


@pytest.fixture(scope="module")
def batched(mimi, tmp_path_factory):
    spec, _ = export_codec_decoder(mimi, tmp_path_factory.mktemp("codec") / "batched.onnx", max_streams=MAX_STREAMS)
    return spec


@pytest.fixture(scope="module")
def single(mimi, tmp_path_factory):
    spec, _ = export_codec_decoder(mimi, tmp_path_factory.mktemp("codec") / "single.onnx", max_streams=None)
    return spec


def zero_state(spec, streams: int) -> dict[str, np.ndarray]:
    dims = {**spec.dims, STREAMS: streams}
    return {t.name: np.zeros(t.bounded(dims).static_shape, t.dtype) for t in spec.inputs if t.name.startswith(STATE_IN)}


def step(sess, spec, codes, active, state) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One call: pcm [S, samples] and the next state."""
    feeds = {"codes": codes, **state}
    if active is not None:
        feeds[ACTIVE] = active
    names = [t.name for t in spec.outputs]
    out = dict(zip(names, sess.run(names, feeds)))
    return out["pcm"][:, 0], {i: out[o] for i, o in spec.state}


def decode_alone(sess, spec, codes: np.ndarray) -> np.ndarray:
    """A stream's codes [F, Q] decoded in S = 1 calls: pcm [F, samples]."""
    state, pcm = zero_state(spec, 1), []
    active = np.ones(1, np.bool_) if any(t.name == ACTIVE for t in spec.inputs) else None
    for frame in codes:
        out, state = step(sess, spec, frame[None, :, None], active, state)
        pcm.append(out[0])
    return np.stack(pcm)


@pytest.mark.parametrize(("streams", "threads"), [(3, 1), (8, 1), (5, 2), (8, 2)])
def test_each_row_decodes_exactly_its_solo_stream(batched, streams, threads):
    """Rows start at different frames and sit some frames out; each gives its solo pcm bit for bit,
    and a row sitting a frame out keeps every state tensor exactly."""
    sess = session(batched.path, threads)
    rng = np.random.default_rng(streams)
    codes = rng.integers(0, 64, (streams, FRAMES, Q))
    starts = [3 * r for r in range(streams)]
    idle = [(t + r) % 5 == 4 and r % 2 == 1 for r in range(streams) for t in range(4 * FRAMES)]
    state, done, pcm = zero_state(batched, streams), [0] * streams, [[] for _ in range(streams)]
    t = 0
    while min(done) < FRAMES:
        active = np.array([t >= starts[r] and done[r] < FRAMES and not idle[r * 4 * FRAMES + t]
                           for r in range(streams)])
        frame = np.stack([codes[r, min(done[r], FRAMES - 1)] for r in range(streams)])[:, :, None]
        out, new = step(sess, batched, frame, active, state)
        for r in range(streams):
            if active[r]:
                pcm[r].append(out[r].copy())
                done[r] += 1
            else:
                assert all(np.array_equal(new[name][r], state[name][r]) for name in state), (r, t)
        state, t = new, t + 1
    assert t > FRAMES + starts[-1]  # the idle frames really happened
    for r in range(streams):
        alone = decode_alone(sess, batched, codes[r])
        assert np.array_equal(np.stack(pcm[r]), alone), r
        assert np.abs(alone).std() > 0.1


def test_no_row_reads_another(batched):
    """A row full of NaN, far along its stream, changes nothing in the others."""
    sess = session(batched.path)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, (3, Q, 1))
    clean = zero_state(batched, 3)
    poisoned = {name: value.copy() for name, value in clean.items()}
    for value in poisoned.values():
        value[1] = 10**6 if value.dtype == np.int64 else np.nan
    active = np.ones(3, np.bool_)
    a, _ = step(sess, batched, codes, active, clean)
    b, state = step(sess, batched, codes, active, poisoned)
    assert np.isnan(b[1]).all()
    for r in (0, 2):
        assert np.array_equal(a[r], b[r])
        assert all(np.isfinite(v[r]).all() for v in state.values())


def test_graph_io_has_the_stream_axis(batched, single):
    assert batched.dims == {STREAMS: MAX_STREAMS}
    assert [t.name for t in batched.inputs[:2]] == ["codes", ACTIVE]
    assert batched.input("codes").shape == (STREAMS, Q, 1) and batched.input(ACTIVE).shape == (STREAMS,)
    assert batched.input(ACTIVE).dtype == np.bool_
    assert batched.outputs[0].name == "pcm" and batched.outputs[0].shape == (STREAMS, 1, 1920)
    for i, o in batched.state:
        assert batched.input(i).shape[0] == batched.output(o).shape[0] == STREAMS
        assert i.startswith(STATE_IN) and o.startswith(STATE_OUT)
    # the one-stream form older artifacts have: no stream axis, no active flag, the same state
    assert single.dims == {} and ACTIVE not in {t.name for t in single.inputs}
    assert single.input("codes").shape == (1, Q, 1)
    assert [p.input for p in single.state] == [p.input for p in batched.state]


def test_the_one_stream_graph_decodes_what_a_row_does(batched, single):
    codes = np.random.default_rng(1).integers(0, 64, (30, Q))
    one = decode_alone(session(single.path), single, codes)
    row = decode_alone(session(batched.path), batched, codes)
    np.testing.assert_allclose(one, row, rtol=0, atol=1e-5)


def test_binding_keeps_rows_a_smaller_batch_leaves_out(batched):
    """The runtime's binding double-buffers the state; a row a smaller batch leaves out for an odd
    number of calls must come back as it was, not one call stale."""
    binding = OrtGraph(session(batched.path), batched).binding()
    codes = np.random.default_rng(2).integers(0, 64, (12, Q))
    got = []
    for t, frame in enumerate(codes):
        s = 1 if t in (4, 7, 8, 9) else 3  # row 2 sits out 1, then 3 calls
        binding.set_dims({STREAMS: s})
        feeds = {"codes": np.repeat(frame[None, :, None], s, 0), ACTIVE: np.ones(s, np.bool_)}
        if s == 3:
            got.append(binding.run(feeds)["pcm"][2, 0].copy())
        else:
            binding.run(feeds)
    alone = decode_alone(session(batched.path), batched, codes[[t for t in range(12) if t not in (4, 7, 8, 9)]])
    assert np.array_equal(np.stack(got), alone)
    binding.set_dims({STREAMS: 3})
    binding.reset_state(slice(2, 3))
    binding.set_dims({STREAMS: 1})
    binding.run({"codes": codes[0][None, :, None], ACTIVE: np.ones(1, np.bool_)})
    binding.set_dims({STREAMS: 3})
    out = binding.run({"codes": np.repeat(codes[0][None, :, None], 3, 0), ACTIVE: np.ones(3, np.bool_)})
    assert np.array_equal(out["pcm"][2, 0], alone[0])  # the reset row starts afresh


# --- the runtime -------------------------------------------------------------------------------

PLANS = [
    Plan(SCRIPTS[0], GREEDY, 0),
    Plan(SCRIPTS[1], GenerationParams(seed=7), 2),
    Plan(SCRIPTS[2], GenerationParams(seed=1), 5, word_by_word=True),
    Plan(SCRIPTS[3], GREEDY, 9),
    Plan(SCRIPTS[2], GenerationParams(seed=4), 12),  # waits for a slot, then takes a used one
]


def check_together(artifacts, batched_codec: bool) -> None:
    alone = Dia2Runtime.load(artifacts, threads=1, max_streams=1)
    together = Dia2Runtime.load(artifacts, threads=1, max_streams=4)
    assert together.engine is not None and together.engine.stepper.batched_codec is batched_codec
    assert len(together.engine.stepper.decoders) == (1 if batched_codec else 4)
    results = run_together(together, PLANS)
    for plan, result in zip(PLANS, results):
        assert differences(result, solo(alone, plan)) == [], plan  # pcm included
    assert together.engine.stats().streams_stepped > together.engine.stats().frames


def test_runtime_streams_each_get_their_solo_audio(tiny_artifacts):
    assert ACTIVE in {t.name for t in load_manifest(tiny_artifacts).graph(CODEC_DECODER).inputs}
    check_together(tiny_artifacts, batched_codec=True)


def test_artifacts_with_a_one_stream_decoder_still_run(tiny_checkpoint, tiny_artifacts, tmp_path):
    """A decoder without a stream axis (artifacts built before it had one): one binding a slot."""
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    manifest = load_manifest(out)
    mimi = load_mimi(resolve_checkpoint(checkpoint=tiny_checkpoint).mimi_ref)
    spec, _ = export_codec_decoder(mimi, out / "codec_decoder.onnx", max_streams=None,
                                   num_quantizers=manifest.audio_channels)
    write_manifest(replace(manifest, graphs={**manifest.graphs, CODEC_DECODER: spec}), out)
    assert ACTIVE not in {t.name for t in load_manifest(out).graph(CODEC_DECODER).inputs}
    check_together(out, batched_codec=False)
