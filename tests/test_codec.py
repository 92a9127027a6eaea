"""Parity of the streaming Mimi decoder / encoder graphs (torch, ONNX, runtime) with transformers' MimiModel."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from transformers import MimiModel  # noqa: E402

from dia2_trt.export.codec import export_codec_decoder, export_codec_encoder  # noqa: E402
from dia2_trt.models.mimi_stream import MimiEncoderGraph, MimiStreamingDecoder, make_tiny_mimi  # noqa: E402
from dia2_trt.runtime.backends import OrtGraph  # noqa: E402
from dia2_trt.runtime.codec import CodecStream  # noqa: E402

Q = 8
# 300 frames = 600 transformer steps at 25 Hz: well past the 250-step attention window
FRAMES = 300
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model's ops are so small that thread synchronisation, not math, would dominate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mimi():
    return make_tiny_mimi(seed=0, num_quantizers=Q)


@pytest.fixture(scope="module")
def codes(mimi):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, mimi.config.codebook_size, (1, Q, FRAMES), generator=gen)


@pytest.fixture(scope="module")
def reference(mimi, codes):
    with torch.no_grad():
        (audio,) = mimi.decode(codes, return_dict=False)
    return audio[0, 0].numpy()


@pytest.fixture(scope="module")
def decoder_onnx(mimi, tmp_path_factory):
    path = tmp_path_factory.mktemp("codec") / "decoder.onnx"
    return (path, *export_codec_decoder(mimi, path, opset=18, precision="fp32", max_streams=4))


@pytest.fixture(scope="module")
def encoder_onnx(mimi, tmp_path_factory):
    path = tmp_path_factory.mktemp("codec") / "encoder.onnx"
    return path, export_codec_encoder(mimi, path, opset=18, precision="fp32")


def stream_torch(decoder, codes):
    state = decoder.initial_state()
    chunks = []
    with torch.no_grad():
        for t in range(codes.shape[2]):
            pcm, *state = decoder(codes[:, :, t : t + 1], torch.ones(1, dtype=torch.bool), *state)
            chunks.append(pcm[0, 0].numpy())
    return np.concatenate(chunks)


def stream_ort(path, spec, codes):
    """One stream (row 0 of a graph with a stream axis, always active)."""
    sess = session(path)
    one = {**spec.dims, "streams": 1}
    feeds = {io.name: np.ones(io.shape, io.dtype) if io.name == "active" else np.zeros(io.shape, io.dtype)
             for io in (t.bounded(one) for t in spec.inputs)}
    outputs = [io.name for io in spec.outputs]
    chunks = []
    for t in range(codes.shape[2]):
        feeds["codes"] = codes[:, :, t : t + 1].numpy()
        results = dict(zip(outputs, sess.run(outputs, feeds)))
        feeds.update({pair.input: results[pair.output] for pair in spec.state})
        chunks.append(results["pcm"][0, 0])
    return np.concatenate(chunks)


def runtime_codec(path, spec, info, encoder=None) -> CodecStream:
    """The runtime's CodecStream over ONNX Runtime bindings of the exported graphs and their manifest entries."""
    enc = OrtGraph(session(encoder[0]), encoder[1]).binding() if encoder else None
    return CodecStream(OrtGraph(session(path), spec).binding(), info.codebook_size, enc)


def test_torch_stream_matches_batch_decode(mimi, codes, reference):
    audio = stream_torch(MimiStreamingDecoder(mimi), codes)
    assert audio.shape == reference.shape == (FRAMES * 1920,)
    assert np.abs(reference).std() > 0.1  # the bound below is meaningful at this amplitude
    assert np.abs(audio - reference).max() <= TOL


def test_torch_stream_with_fewer_codebooks(mimi, codes):
    few = codes[:, :4, :20]
    with torch.no_grad():
        (expected,) = mimi.decode(few, return_dict=False)
    audio = stream_torch(MimiStreamingDecoder(mimi, num_quantizers=4), few)
    assert np.abs(audio - expected[0, 0].numpy()).max() <= TOL


def test_onnx_stream_matches_batch_decode(decoder_onnx, codes, reference):
    path, spec, _ = decoder_onnx
    assert [pair.input[len("state.") :] for pair in spec.state] == [
        pair.output[len("next.") :] for pair in spec.state
    ]
    audio = stream_ort(path, spec, codes)
    assert np.abs(audio - reference).max() <= TOL


def test_onnx_fp16_stream_is_close(mimi, codes, reference, tmp_path):
    spec, _ = export_codec_decoder(mimi, tmp_path / "decoder16.onnx", precision="fp16", max_streams=4)
    assert all(io.dtype != np.float16 for io in spec.inputs + spec.outputs)
    audio = stream_ort(tmp_path / "decoder16.onnx", spec, codes[:, :, :60])
    assert np.abs(audio - reference[: audio.size]).max() <= 1e-2 * np.abs(reference).max()


def test_encoder_matches_mimi_encode(mimi, encoder_onnx, reference):
    path, spec = encoder_onnx
    sess = session(path)
    graph = MimiEncoderGraph(mimi)
    rng = np.random.default_rng(2)
    # lengths off the frame grid exercise the encoder's right padding
    clips = [reference[: 40 * 1920], reference[: 7 * 1920 + 333], 0.3 * rng.standard_normal(1).astype(np.float32)]
    for clip in clips:
        pcm = torch.from_numpy(np.ascontiguousarray(clip)).reshape(1, 1, -1)
        with torch.no_grad():
            (expected,) = mimi.encode(pcm, return_dict=False)[:1]
            torch_codes = graph(pcm)
        (onnx_codes,) = sess.run(["codes"], {"pcm": pcm.numpy()})
        assert torch.equal(torch_codes, expected)
        np.testing.assert_array_equal(onnx_codes, expected.numpy())
    assert spec.outputs[0].shape == (1, Q, "frames")


def test_codes_matter_and_decoding_is_causal(mimi, codes):
    decoder = MimiStreamingDecoder(mimi)
    changed = codes[:, :, :30].clone()
    changed[0, Q - 1, 20] = (changed[0, Q - 1, 20] + 1) % mimi.config.codebook_size
    a, b = stream_torch(decoder, codes[:, :, :30]), stream_torch(decoder, changed)
    cut = 20 * 1920
    np.testing.assert_array_equal(a[:cut], b[:cut])
    assert np.abs(a[cut:] - b[cut:]).max() > 1e-2


def test_runtime_codec_reset_and_encode(mimi, decoder_onnx, encoder_onnx, codes, reference):
    (path, spec, info), (enc_path, enc_spec) = decoder_onnx, encoder_onnx
    codec = runtime_codec(path, spec, info, encoder=(enc_path, enc_spec))
    assert codec.num_quantizers == info.num_quantizers == Q
    frames = codes[0].numpy().T[:140]
    first = np.concatenate([codec.decode_frame(f) for f in frames])
    codec.reset()
    second = np.concatenate([codec.decode_frame(f) for f in frames])
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - reference[: first.size]).max() <= TOL
    clip = reference[: 5 * 1920]
    with torch.no_grad():
        (expected,) = mimi.encode(torch.from_numpy(clip).reshape(1, 1, -1), return_dict=False)[:1]
    np.testing.assert_array_equal(codec.encode(clip), expected[0].numpy())


def test_bad_inputs_raise(mimi, decoder_onnx):
    path, spec, info = decoder_onnx
    codec = runtime_codec(path, spec, info)
    with pytest.raises(ValueError):
        codec.decode_frame(np.zeros(Q - 1, dtype=np.int64))
    with pytest.raises(ValueError):
        codec.decode_frame(np.full(Q, mimi.config.codebook_size, dtype=np.int64))
    with pytest.raises(ValueError):
        codec.encode(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError):
        export_codec_decoder(mimi, "unused.onnx", precision="int8", max_streams=4)
    with pytest.raises(ValueError):
        export_codec_decoder(mimi, "unused.onnx", max_streams=0)
    decoder = MimiStreamingDecoder(mimi)
    with pytest.raises(ValueError):
        decoder(torch.zeros(1, Q, 2, dtype=torch.int64), torch.ones(1, dtype=torch.bool), *decoder.initial_state())


def test_tiny_mimi_round_trips(mimi, tmp_path):
    mimi.save_pretrained(tmp_path)
    loaded = MimiModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(sorted(mimi.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), name
    table = mimi.quantizer.acoustic_residual_vector_quantizer.layers[0].codebook.embed_sum
    assert table.std() > 0.5


def test_large_graphs_keep_their_weights_once_in_a_side_file(mimi, tmp_path, monkeypatch):
    """Past EXTERNAL_DATA_BYTES the weights go to FILE.data, written once: the encoder is saved twice
    (its frame axis is renamed after export), and onnx appends to a data file it finds."""
    import onnx

    from dia2_trt.export import codec, onnx_io

    monkeypatch.setattr(codec, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    path = tmp_path / "encoder.onnx"
    export_codec_encoder(mimi, path, opset=18, precision="fp32")
    data = path.with_name(path.name + ".data")
    model = onnx.load(str(path), load_external_data=False)
    places = [{e.key: int(e.value) for e in t.external_data if e.key != "location"}
              for t in model.graph.initializer if t.external_data]
    stored = sum(p["length"] for p in places)
    assert data.is_file() and stored > 0, "no external weights"
    assert min(p["offset"] for p in places) == 0 and data.stat().st_size < 1.5 * stored
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
