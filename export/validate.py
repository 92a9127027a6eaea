"""``dia2-export validate``: every graph against PyTorch, through Polygraphy's Comparator.

PyTorch outputs enter Polygraphy as ``RunResults`` next to an ONNX Runtime
runner's, over multi-step sequences: a teacher-forced backbone decode (the
cache fed to step t is PyTorch's, so errors cannot compound and hide), the
depformer frame on those hidden states, and > 300 streaming codec frames (past
the 250-step attention window) whose concatenation is also checked against
transformers' batch ``MimiModel.decode``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator, CompareFunc, IterationResult, RunResults
from polygraphy.logger import G_LOGGER

from dia2_trt.models.mimi_stream import MimiEncoderGraph, MimiStreamingDecoder
from dia2_trt.models.sources import CheckpointFiles, load_mimi, load_model, resolve_checkpoint
from dia2_trt.models.tokens import resolve_token_ids
from dia2_trt.runtime.artifacts import load_manifest, sha256
from dia2_trt.runtime.manifest import (
    ACTIVE,
    BACKBONE,
    CODEC_DECODER,
    CODEC_ENCODER,
    DEPFORMER,
    STATE_IN,
    STATE_OUT,
    GraphSpec,
    Manifest,
)

from .graphs import BackboneStep, DepformerFrame
from .reference_run import decode_batch

# (atol, rtol) per precision; fp16 graphs are judged on logits and tokens, not bits.
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-2, 5e-2)}
TOKEN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9}


def validate_artifacts(artifacts: Path, files: CheckpointFiles | None, *, steps: int, codec_frames: int,
                       seed: int, echo: Callable[[str], None] = print) -> dict:
    G_LOGGER.module_severity = G_LOGGER.WARNING  # per-iteration INFO lines drown the report
    manifest = load_manifest(artifacts)
    files = files or _source_files(manifest)
    _check_source(manifest, files)
    precision = manifest.precision
    if precision not in TOLERANCES:
        raise ValueError(f"{precision} artifacts are judged on tokens, not against PyTorch's numbers: "
                         f"validate them with --against FP32_ARTIFACTS")
    atol, rtol = TOLERANCES[precision]
    model = load_model(files)
    mimi = load_mimi(files.mimi_ref)
    gen = torch.Generator().manual_seed(seed)
    report = {"artifacts": str(artifacts), "precision": precision, "atol": atol, "rtol": rtol,
              "built_with": manifest.tools, "graphs": {}}

    echo(f"[validate] backbone: {steps} teacher-forced steps")
    feeds, torch_out = _backbone_sequence(model, manifest, steps, gen)
    report["graphs"]["backbone"] = _compare(manifest.graph(BACKBONE).path, feeds, torch_out, atol, rtol)

    echo("[validate] depformer: greedy and sampled frames")
    ids = resolve_token_ids(model.config, files.tokenizer_dir)
    dep = _depformer_check(manifest.graph(DEPFORMER), model, ids, torch_out, gen)
    dep["passed"] = dep["token_agreement"] >= TOKEN_AGREEMENT[precision]
    report["graphs"]["depformer"] = dep

    echo(f"[validate] codec decoder: {codec_frames} streaming frames")
    report["graphs"]["codec_decoder"] = _codec_decoder_check(
        manifest.graph(CODEC_DECODER), mimi, model.config.data.audio_channels,
        codec_frames, gen, atol, rtol)
    echo("[validate] codec encoder")
    report["graphs"]["codec_encoder"] = _codec_encoder_check(
        manifest.graph(CODEC_ENCODER), mimi, model.config.data.audio_channels, gen)

    report["failures"] = [name for name, r in report["graphs"].items() if not r["passed"]]
    report["passed"] = not report["failures"]
    for name, r in report["graphs"].items():
        echo(f"[validate] {name}: {'ok' if r['passed'] else 'FAILED'} {_summary(r)}")
    return report


def _source_files(manifest: Manifest) -> CheckpointFiles:
    src = manifest.source
    if src.checkpoint and Path(src.checkpoint).is_dir():
        return resolve_checkpoint(checkpoint=src.checkpoint)
    if src.repo_id:
        return resolve_checkpoint(size=src.repo_id.rsplit("-", 1)[-1])
    raise ValueError("the manifest does not say where its checkpoint is; pass --checkpoint or --size")


def _check_source(manifest: Manifest, files: CheckpointFiles) -> None:
    """Compared with other weights than it was exported from, every graph would "fail" for no fault of its own."""
    for path in (files.config_path, files.weights_path):
        recorded = manifest.source.files.get(path.name)
        if recorded and sha256(path) != recorded:
            raise ValueError(f"{path} is not the checkpoint these artifacts were built from (its sha256 differs "
                             f"from the manifest's source.files); pass that one with --checkpoint")


def _backbone_sequence(model, manifest: Manifest, steps: int, gen: torch.Generator):
    """Random in-vocabulary tokens, positions 0..steps-1, PyTorch's own cache fed forward."""
    cfg = model.config
    step = BackboneStep(model).eval()
    tokens, _, _, *caches = BackboneStep.example_inputs(model, manifest.cache_capacity, streams=1)
    n_layer = len(caches) // 2
    dtype = manifest.graph(BACKBONE).input(step.input_names[3]).dtype
    feeds, outputs = [], []
    for t in range(steps):
        tokens[:, :2] = torch.randint(0, cfg.data.text_vocab_size, (2, 2), generator=gen)
        tokens[:, 2:] = torch.randint(0, cfg.data.audio_vocab_size, (2, cfg.data.audio_channels), generator=gen)
        position = torch.tensor([t])
        feeds.append({"tokens": tokens.numpy().copy(), "position": position.numpy(),
                      "cache_length": position.numpy(),
                      **{name: c.numpy().astype(dtype) for name, c in zip(step.input_names[3:], caches)}})
        with torch.no_grad():
            out = step(tokens, position, position, *caches)
        outputs.append(dict(zip(BackboneStep.output_names, (np.ascontiguousarray(o.numpy()) for o in out))))
        for i in range(n_layer):
            caches[i][:, :, t] = out[3][i]
            caches[n_layer + i][:, :, t] = out[4][i]
    return feeds, outputs


def _compare(path: Path, feeds: list[dict], torch_out: list[dict], atol: float, rtol: float) -> dict:
    """Polygraphy's verdict plus max/mean absolute and relative error per output."""
    ort_results = _run_onnxrt(path, feeds)
    results = RunResults()
    results.append(("pytorch", [IterationResult(outputs=o, runner_name="pytorch") for o in torch_out]))
    results.extend(ort_results)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    ort_out = ort_results[0][1]
    stats = {name: _error_stats([o[name] for o in torch_out], [np.asarray(r[name]) for r in ort_out])
             for name in torch_out[0]}
    return {"passed": bool(accuracy), "iterations": len(feeds), "outputs": stats}


def _run_onnxrt(path: Path, feeds: list[dict]) -> RunResults:
    # without streaming=True, Comparator.run returns one materialized RunResults (untyped: it may
    # also return a generator)
    return cast(RunResults, Comparator.run([OnnxrtRunner(SessionFromOnnx(str(path)))], data_loader=feeds))


def _error_stats(expected: list[np.ndarray], actual: list[np.ndarray]) -> dict:
    e = np.concatenate([x.astype(np.float64).ravel() for x in expected])
    a = np.concatenate([x.astype(np.float64).ravel() for x in actual])
    diff = np.abs(a - e)
    rel = diff / np.maximum(np.abs(e), 1e-6)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float(rel.max()), "mean_rel": float(rel.mean())}


def _depformer_check(spec: GraphSpec, model, ids, backbone_out: list[dict], gen: torch.Generator) -> dict:
    """Same inputs and noise to both: tokens must agree (exactly in fp32). One stream a call."""
    frame = DepformerFrame(model, ids).eval()
    example = DepformerFrame.example_inputs(model, streams=1)
    feeds, torch_out = [], []
    for i, out in enumerate(backbone_out):
        temperature = 0.0 if i % 2 == 0 else 0.8
        cfg_scale = 2.0 if i % 4 < 2 else 1.0
        args = (torch.from_numpy(out["hidden"]).float(), torch.from_numpy(out["cb0_logits"]).float(),
                torch.randint(0, 64, (1, 2), generator=gen), torch.rand(example[3].shape, generator=gen),
                torch.tensor([temperature]), torch.tensor([50]), torch.tensor([cfg_scale]), torch.tensor([50]))
        with torch.no_grad():
            torch_out.append({"audio_tokens": frame(*args).numpy()})
        feeds.append({n: a.numpy() for n, a in zip(DepformerFrame.input_names, args)})
    ort_out = _run_onnxrt(spec.path, _cast_feeds(spec, feeds))[0][1]
    same = [np.array_equal(t["audio_tokens"], np.asarray(o["audio_tokens"])) for t, o in zip(torch_out, ort_out)]
    return {"iterations": len(feeds), "token_agreement": float(np.mean(same))}


def _cast_feeds(spec: GraphSpec, feeds: list[dict]) -> list[dict]:
    """Match the graph's input dtypes (fp16 graphs take fp16 activations)."""
    dtypes = {t.name: t.dtype for t in spec.inputs}
    return [{k: v.astype(dtypes[k]) for k, v in f.items()} for f in feeds]


def _codec_decoder_check(spec: GraphSpec, mimi, q: int, frames: int, gen: torch.Generator, atol: float,
                         rtol: float) -> dict:
    decoder = MimiStreamingDecoder(mimi, q).eval()
    codes = torch.randint(0, mimi.config.codebook_size, (1, q, frames), generator=gen)
    state = decoder.initial_state()
    in_names = ["codes", ACTIVE] + [STATE_IN + n for n in decoder.state_names]
    out_names = ["pcm"] + [STATE_OUT + n for n in decoder.state_names]
    graph_inputs = {t.name for t in spec.inputs}  # one stream; a graph without a stream axis has no ``active``
    feeds, torch_out = [], []
    for f in range(frames):
        args = (codes[:, :, f:f + 1], torch.ones(1, dtype=torch.bool), *state)
        feeds.append({n: a.numpy() for n, a in zip(in_names, args) if n in graph_inputs})
        with torch.no_grad():
            out = decoder(*args)
        torch_out.append(dict(zip(out_names, (np.ascontiguousarray(o.numpy()) for o in out))))
        state = out[1:]
    result = _compare(spec.path, _cast_feeds(spec, feeds), torch_out, atol, rtol)
    streamed = np.concatenate([o["pcm"].ravel() for o in torch_out])
    batch = decode_batch(mimi, codes[0].numpy())
    # decode_batch clamps like the reference; the graph's pcm is unclamped.
    err = float(np.abs(np.clip(streamed, -1, 1) - batch).max())
    result["vs_batch_decode_max_abs"] = err
    result["passed"] = result["passed"] and err <= atol
    return result


def _codec_encoder_check(spec: GraphSpec, mimi, q: int, gen: torch.Generator) -> dict:
    samples = int(mimi.config.sampling_rate * 2.4)
    pcm = torch.randn(1, 1, samples, generator=gen) * 0.1
    with torch.no_grad():
        expected = mimi.encode(pcm, num_quantizers=q).audio_codes.numpy()
        ours = MimiEncoderGraph(mimi, q)(pcm).numpy()
    out = _run_onnxrt(spec.path, _cast_feeds(spec, [{"pcm": pcm.numpy()}]))[0][1][0]
    codes = np.asarray(out[next(iter(out.keys()))])
    agreement = float(np.mean(codes == expected)) if codes.shape == expected.shape else 0.0
    return {"passed": agreement == 1.0 and np.array_equal(ours, expected), "code_agreement": agreement,
            "frames": int(expected.shape[-1])}


def _summary(r: dict) -> str:
    if "outputs" in r:
        worst = max(r["outputs"].items(), key=lambda kv: kv[1]["max_abs"])
        return f"(worst {worst[0]}: max abs {worst[1]['max_abs']:.2e})"
    if "token_agreement" in r:
        return f"(token agreement {r['token_agreement']:.3f})"
    return f"(code agreement {r.get('code_agreement', 0):.3f})"
