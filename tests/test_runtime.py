"""The torch-free runtime against the PyTorch reference loop, on tiny random checkpoints.

Three artifact sets are built once per session: the default tiny variant (second
stream on, so no lead-in crop, as in the reference), the "full" variant with
the second stream off, which exercises the crop and first-word timing, and one
whose weights schedule ends in a repeat, so its depformer stages run as a Loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import pytest

from dia2_trt.runtime import Dia2Runtime, TruncationWarning
from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.params import GenerationParams
from dia2_trt.runtime.sampling import guide, sample
from dia2_trt.runtime.script import ScriptError

torch = pytest.importorskip("torch")

SCRIPTS = [
    "[S1] Hello there, how are you? [S2] I'm fine, thanks.",
    '[S1] Good morning. <break time="0.5s"/> [S2] Good night, my friend! [S1] See you tomorrow.',
    "[S2] Oh no!",
    # A leading break delays the first main-stream new word: without a second stream that crops the lead-in.
    '[S1] <break time="0.8s"/> Hello there.',
]
GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


@contextmanager
def _torch_threads(count: int):
    """Torch's OpenMP threads degrade badly when the cores are shared (seconds per tiny matmul): use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def built(checkpoint_factory, artifacts_factory, tmp_path_factory):
    """{variant: (checkpoint files, artifact dir)}: conftest's default build, one without a second
    stream and one whose depformer stages loop."""
    from dia2_trt.export.build import BuildOptions, build_artifacts
    from dia2_trt.models.sources import resolve_checkpoint
    from dia2_trt.models.tiny import build_tiny_checkpoint

    with _torch_threads(1):
        out = {"default": (resolve_checkpoint(checkpoint=checkpoint_factory("default", 0)), artifacts_factory())}
        root = tmp_path_factory.mktemp("runtime-nosecond")
        ckpt = build_tiny_checkpoint(root / "ckpt", seed=1, variant="full", overrides={"data.second_stream_ahead": 0})
        files = resolve_checkpoint(checkpoint=ckpt)
        build_artifacts(files, root / "art", BuildOptions())
        out["nosecond"] = (files, root / "art")
        # A schedule whose last stages share weights, as the 2B's do: the depformer is exported as a Loop.
        root = tmp_path_factory.mktemp("runtime-looped")
        ckpt = build_tiny_checkpoint(root / "ckpt", seed=2, overrides={"runtime.weights_schedule": [0, 1, 1, 1]})
        files = resolve_checkpoint(checkpoint=ckpt)
        build_artifacts(files, root / "art", BuildOptions())
        out["looped"] = (files, root / "art")
    return out


@pytest.fixture(scope="session")
def runtimes(built):
    return {name: Dia2Runtime.load(art, threads=1) for name, (_, art) in built.items()}


@pytest.fixture(scope="module")
def solo_runtimes(built):
    """One stepper a session, run in the caller's thread: the frame a chunk is read at is the frame
    it was made at (on a batched runtime the engine thread runs on while the reader wakes up)."""
    return {name: Dia2Runtime.load(art, threads=1, max_streams=1) for name, (_, art) in built.items()}


@pytest.fixture(scope="session")
def reference(built):
    """reference(variant, script, cfg_scale) -> the greedy ReferenceResult, memoised."""
    from dia2_trt.models.reference import ReferenceLoop
    from dia2_trt.models.sources import load_model
    from dia2_trt.models.tokens import resolve_token_ids
    from dia2_trt.runtime.tokenizer import TextTokenizer

    loops, results = {}, {}
    for name, (files, art) in built.items():
        model = load_model(files)
        ids = resolve_token_ids(model.config, files.tokenizer_dir)
        encode = TextTokenizer.from_dir(files.tokenizer_dir).encode
        loops[name] = ReferenceLoop(model, ids, encode, load_manifest(art).frame_rate)

    def run(variant: str, script: str, cfg_scale: float):
        key = variant, script, cfg_scale
        if key not in results:
            with _torch_threads(1):
                results[key] = loops[variant].run(script, GenerationParams(cfg_scale=cfg_scale, **GREEDY))
        return results[key]

    return run


# --- parity with the reference ------------------------------------------------

# Every script on each variant once, and CFG off on a few: each reference run costs a second or more.
PARITY = [
    ("default", 0, 2.0), ("default", 0, 1.0), ("default", 1, 2.0), ("default", 2, 2.0),
    ("nosecond", 0, 2.0), ("nosecond", 1, 1.0), ("nosecond", 3, 2.0), ("nosecond", 3, 1.0),
    ("looped", 0, 2.0), ("looped", 1, 1.0),
]


@pytest.mark.parametrize("variant,script,cfg_scale", PARITY)
def test_greedy_matches_reference(runtimes, reference, variant, script, cfg_scale):
    expected = reference(variant, SCRIPTS[script], cfg_scale)
    result = runtimes[variant].speak(SCRIPTS[script], GenerationParams(cfg_scale=cfg_scale, **GREEDY))
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    assert result.timestamps == expected.timestamps
    assert result.frames == expected.frames
    assert not result.truncated
    assert result.pcm.size == result.tokens.shape[1] * runtimes[variant].manifest.samples_per_frame


def test_parity_cases_cover_the_depformer_loop(built):
    import onnx

    graph = onnx.load(str(built["looped"][1] / "depformer.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("Loop") == 1


def test_parity_cases_cover_the_lead_in_crop(runtimes, reference):
    """Without a second stream a delayed first word crops the lead-in: make sure a parity case does."""
    expected = reference("nosecond", SCRIPTS[3], 2.0)
    crop = expected.delayed.shape[1] - max(runtimes["nosecond"].manifest.delays) - expected.tokens.shape[1]
    assert crop > 0


def test_same_seed_same_output(runtimes):
    rt = runtimes["default"]
    params = GenerationParams(seed=7)
    a, b = rt.speak(SCRIPTS[0], params), rt.speak(SCRIPTS[0], params)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.pcm, b.pcm)
    assert a.timestamps == b.timestamps
    c = rt.speak(SCRIPTS[0], GenerationParams(seed=8))
    assert c.tokens.shape != a.tokens.shape or not np.array_equal(c.tokens, a.tokens)


# --- sampler --------------------------------------------------------------------

# Chi-square critical values at p = 0.001, by degrees of freedom.
_CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _expected_probs(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    z = np.exp((logits - logits.max()) / temperature)
    p = z / z.sum()
    if 0 < top_k < p.size:
        p[np.argsort(p)[:-top_k]] = 0.0
    return p / p.sum()


def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("temperature,top_k", [(0.7, 4), (1.3, 0), (0.5, 3)])
def test_sampler_follows_reference_distribution(temperature, top_k):
    from dia2_trt.models.reference import sample as reference_sample

    logits = np.array([1.0, 2.5, 0.3, 2.0, -1.0, 1.7], dtype=np.float32)
    probs = _expected_probs(logits.astype(np.float64), temperature, top_k)
    draws = 6000
    rng = np.random.default_rng(0)
    ours = np.bincount([sample(logits, temperature, top_k, rng) for _ in range(draws)], minlength=logits.size)
    gen = torch.Generator().manual_seed(0)
    theirs = np.bincount([reference_sample(torch.from_numpy(logits), temperature, top_k, gen) for _ in range(draws)],
                         minlength=logits.size)
    for counts in (ours, theirs):
        assert counts[probs == 0].sum() == 0
        stat, dof = _chi2(counts, probs)
        assert stat < _CHI2_999[dof], (counts, probs * draws)


def test_sampler_edge_cases():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 1.0], dtype=np.float32)
    assert sample(logits, 0.0, 50, rng) == 1
    assert sample(np.full(4, -np.inf, dtype=np.float32), 1.0, 2, rng) == 0  # nothing has mass -> id 0
    masked = np.array([-np.inf, 0.0, -np.inf, 0.5], dtype=np.float32)
    assert {sample(masked, 1.0, 0, rng) for _ in range(200)} <= {1, 3}


@pytest.mark.parametrize("scale,filter_k", [(2.0, 50), (2.0, 3), (3.0, 1), (1.0, 3), (0.3, 2), (1.5, 0)])
def test_guidance_matches_reference(scale, filter_k):
    from dia2_trt.models.reference import guidance

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 40)).astype(np.float32)
    ours = guide(logits, scale, filter_k)
    params = GenerationParams(cfg_scale=scale, cfg_filter_k=filter_k)
    theirs = guidance(torch.from_numpy(logits), params)[0].numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_array_equal(ours, theirs)


# --- streaming ------------------------------------------------------------------


# The lead-in script on the no-second-stream variant makes the stream wait for the crop.
STREAMED = [("default", 1), ("nosecond", 3)]


@pytest.mark.parametrize("variant,script", STREAMED)
@pytest.mark.parametrize("params", [GenerationParams(**GREEDY), GenerationParams(seed=3)], ids=["greedy", "sampled"])
def test_stream_equals_speak(solo_runtimes, variant, script, params):
    rt, text = solo_runtimes[variant], SCRIPTS[script]
    whole = rt.speak(text, params)
    frames_at_first_chunk = []
    last_frame = [0]
    session = rt.stream(text, params, progress=lambda p: last_frame.__setitem__(0, p.frame))
    chunks = []
    for chunk in session:
        if not frames_at_first_chunk and chunk.pcm.size:
            frames_at_first_chunk.append(last_frame[0])
        chunks.append(chunk)
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), whole.pcm)
    assert [w for c in chunks for w in c.words] == whole.timestamps
    assert frames_at_first_chunk[0] < session.result.frames // 2  # audio long before the end
    assert session.result.first_audio_seconds < session.result.wall_seconds


def _feed_in_pieces(rt, text: str, params: GenerationParams, size: int):
    session = rt.open_session(params)
    chunks, waits = [], 0
    for start in range(0, len(text), size):
        session.feed(text[start:start + size])
        chunks.extend(session)
        waits += not session.done
    assert not session.done  # with input open the utterance never ends
    session.close()
    chunks.extend(session)
    return session.result, chunks, waits


@pytest.mark.parametrize("variant,script", STREAMED)
@pytest.mark.parametrize("size", [1, 7])
def test_incremental_feed_equals_whole_text(runtimes, variant, script, size):
    rt, params, text = runtimes[variant], GenerationParams(**GREEDY), SCRIPTS[script]
    whole = rt.speak(text, params)
    result, chunks, waits = _feed_in_pieces(rt, text, params, size)
    assert waits > 0
    np.testing.assert_array_equal(result.tokens, whole.tokens)
    assert result.timestamps == whole.timestamps
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), whole.pcm)


# --- bad scripts ----------------------------------------------------------------


@pytest.mark.parametrize("script,message", [
    ("", "empty"),
    ("   \n", "empty"),
    ("[S3] Hello there", "unknown tag"),
    ("[S1] Hello <laugh> there", "unknown tag"),
    ("[S1] " + "hello there friend " * 40, "too long"),
])
def test_bad_scripts_raise(runtimes, script, message):
    with pytest.raises(ScriptError, match=message):
        runtimes["default"].stream(script, GenerationParams(**GREEDY))


def test_context_overrun_is_flagged(runtimes, monkeypatch):
    rt = runtimes["default"]
    monkeypatch.setattr(rt, "frames_needed", lambda entries, params: 0)
    with pytest.warns(TruncationWarning) as caught:
        result = rt.speak("[S1] " + "hello there friend " * 40, GenerationParams(**GREEDY))
    assert result.truncated
    assert result.frames == rt.manifest.max_context_steps
    assert any("truncated" in str(w.message) for w in caught)


# --- no torch at run time ---------------------------------------------------------


def test_runtime_never_imports_torch(built):
    art = built["default"][1]
    code = textwrap.dedent(f"""
        import sys
        import dia2_trt.runtime.cli
        from dia2_trt.runtime import Dia2Runtime
        from dia2_trt.runtime.params import GenerationParams
        result = Dia2Runtime.load({str(art)!r}).speak("[S1] Hello there.", GenerationParams(seed=1))
        assert result.pcm.size > 0
        banned = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                  or m.startswith(("dia2_trt.models", "dia2_trt.export", "dia2_trt.calibration"))]
        assert not banned, banned
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --- command line ---------------------------------------------------------------


def _cli(*args, input=None):
    from click.testing import CliRunner

    from dia2_trt.runtime.cli import main

    return CliRunner().invoke(main, list(args), input=input)


def test_cli_speak_matches_library(built, runtimes, tmp_path):
    art = built["default"][1]
    out, tokens = tmp_path / "a.wav", tmp_path / "t.json"
    done = _cli("speak", SCRIPTS[0], "--artifacts", str(art), "--out", str(out), "--temperature", "0",
                "--tokens-out", str(tokens), "--threads", "1")
    assert done.exit_code == 0, done.stderr
    assert "RTF" in done.stderr and "first audio" in done.stderr
    expected = runtimes["default"].speak(SCRIPTS[0], GenerationParams(**GREEDY))
    saved = json.loads(tokens.read_text())
    assert saved == {"tokens": expected.tokens.tolist(), "timestamps": [list(w) for w in expected.timestamps]}
    import soundfile as sf

    pcm, rate = sf.read(out, dtype="float32")
    assert rate == expected.sample_rate and pcm.size == expected.pcm.size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "t.json"]  # no temporary files left


def test_cli_raw_pcm_from_stdin(built, runtimes):
    done = _cli("speak", "--artifacts", str(built["default"][1]), "--out", "-", "--temperature", "0", "--quiet",
                input=SCRIPTS[2])
    assert done.exit_code == 0, done.stderr
    expected = runtimes["default"].speak(SCRIPTS[2], GenerationParams(**GREEDY))
    pcm = np.frombuffer(done.stdout_bytes, dtype="<i2")
    np.testing.assert_array_equal(pcm, (np.clip(expected.pcm, -1, 1) * 32767).round().astype("<i2"))
    assert done.stderr == ""


@pytest.mark.parametrize("args,message", [
    (["speak", ""], "empty"),
    (["speak", "[S3] Hello"], "unknown tag"),
    (["speak", "[S1] hi <laugh>"], "unknown tag"),
    (["speak", "[S1] " + "hello there friend " * 40], "too long"),
    (["speak", "[S1] hi", "--cfg", "0"], "--cfg"),
    (["speak", "[S1] hi", "--top-k", "-1"], "--top-k"),
    (["speak", "[S1] hi", "--temperature", "-1"], "--temperature"),
    (["speak", "[S1] hi", "--threads", "0"], "--threads"),
    (["speak", "[S1] hi", "--out", "x.aac"], "unknown audio format"),
    (["speak", "--input", "missing.txt"], "cannot read"),
    (["speak", "[S1] hi", "--input", "missing.txt"], "not both"),
    (["speak", "[S1] hi", "--artifacts", "missing-dir"], "artifact directory not found"),
])
def test_cli_bad_input(built, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    defaults = {"--artifacts": str(built["default"][1]), "--out": "out.wav"}
    done = _cli(*args, *[item for k, v in defaults.items() if k not in args for item in (k, v)])
    assert done.exit_code != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []  # never a partial output file
