"""Accuracy of any artifact precision against the fp32 artifacts of the same checkpoint.

The fp32 artifacts speak a real script greedily; its step tokens are then fed to
both artifacts (teacher forcing, each with its own KV cache), so a flipped token
cannot derail the rest of the comparison. Per output (text action, cb0, every
depformer codebook, over the steps whose earlier codebooks agreed): top-1
agreement, the max/mean absolute error of its logits,
and the agreement over the steps where fp32's top-1 margin exceeds that measured
error. Random tiny weights give nearly flat logits, where any error flips a
token; the confident-step agreement is the number that says whether the
precision itself breaks decisions.

Torch-free: ONNX Runtime only (``dia2_trt.export.replay``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.manifest import DEPFORMER
from dia2_trt.runtime.params import GenerationParams
from dia2_trt.runtime.sampling import guide

from .replay import Replay, record

DEFAULT_SCRIPT = ("[S1] Hello there, how are you doing today? [S2] I am fine, thanks for asking. "
                  "[S1] Good to hear. Shall we go for a walk?")
GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)

# The one place pass/fail is decided: per precision, the lowest top-1 agreement any
# output may have over all steps, and over the confident steps (fp32 margin > twice
# the measured logits error, where only a real defect can flip the top-1). The
# all-step floors are set under what the tiny random-weight checkpoint measures
# (flat logits, so they understate real models): tiny measured, worst codebook, fp16
# 0.989, int8 0.916, int4 (block 16) 0.347, int8-qdq 0.579, fp8-qdq 0.695. They catch
# gross breakage; the confident floors are the test.
THRESHOLDS = {
    "fp32": {"agreement": 1.0, "confident_agreement": 1.0},
    "fp16": {"agreement": 0.95, "confident_agreement": 0.99},
    "int8": {"agreement": 0.6, "confident_agreement": 0.95},
    "int8-qdq": {"agreement": 0.5, "confident_agreement": 0.95},
    "fp8-qdq": {"agreement": 0.5, "confident_agreement": 0.95},
    "int4": {"agreement": 0.3, "confident_agreement": 0.95},
}
# The all-step floor needs enough steps to mean anything: a deep codebook is compared only where
# every earlier one agreed, which on 2B int8-qdq left cb19 one step (0 of 1 failed the run). The
# confident floor holds at any count: one confident flip is a defect.
MIN_COMPARED_STEPS = 20
_HEAD = re.compile(r"depformer\.logits\.(\d+)'")


def accuracy_report(candidate: Path, reference: Path, script: str = DEFAULT_SCRIPT,
                    params: GenerationParams = GREEDY, echo: Callable[[str], None] = print,
                    max_steps: int | None = None) -> dict:
    ref_manifest, cand_manifest = _same_checkpoint(Path(reference), Path(candidate))
    precision = cand_manifest.precision
    if precision not in THRESHOLDS:
        raise ValueError(f"no accuracy thresholds for precision {precision!r}")
    echo(f"[accuracy] fp32 greedy run over the script ({reference})")
    trace = record(Path(reference), [script], params)[0]
    if max_steps is not None:  # the first steps only (a slow candidate: fp8-qdq replays at ~20 s a 2B step)
        trace = replace(trace, tokens=trace.tokens[:max_steps], text_tokens=trace.text_tokens[:max_steps],
                        audio_tokens=trace.audio_tokens[:max_steps])
    echo(f"[accuracy] {trace.steps} teacher-forced steps through fp32 and {precision}")
    ref = _collect(Path(reference), trace, params)
    cand = _collect(Path(candidate), trace, params)
    special = [ref_manifest.token_ids.audio_pad, ref_manifest.token_ids.audio_bos]
    outputs = {"action": _compare(ref["action"], cand["action"], ref["action_tokens"], cand["action_tokens"], params)}
    outputs["cb0"] = _compare(ref["cb0"], cand["cb0"], ref["audio"][:, 0], cand["audio"][:, 0], params, mask=special)
    for q in range(1, ref["audio"].shape[1]):
        logits = (ref["heads"][q - 1], cand["heads"][q - 1]) if ref["heads"] and cand["heads"] else (None, None)
        # Codebook q's logits depend on the frame's earlier tokens: compare them only where those agree.
        same_input = np.all(ref["audio"][:, :q] == cand["audio"][:, :q], axis=1)
        outputs[f"cb{q}"] = _compare(*logits, ref["audio"][:, q], cand["audio"][:, q], params, where=same_input)
    report = {"candidate": str(candidate), "reference": str(reference), "precision": precision,
              "steps": trace.steps, "script": script,
              # fp32 replayed teacher-forced must reproduce its own greedy run: the harness checks itself.
              "reference_replay_agreement": float(np.mean(ref["audio"][trace.first_live:]
                                                          == trace.audio_tokens[trace.first_live:])),
              "thresholds": THRESHOLDS[precision], "outputs": outputs}
    report["failures"] = _failures(report)
    report["passed"] = not report["failures"]
    return report


def _same_checkpoint(reference: Path, candidate: Path):
    ref, cand = load_manifest(reference), load_manifest(candidate)
    if ref.precision != "fp32":
        raise ValueError(f"{reference} is {ref.precision}; compare against fp32 artifacts")
    if ref.source.files != cand.source.files or ref.topology != cand.topology:
        raise ValueError(f"{candidate} and {reference} were not built from the same checkpoint")
    return ref, cand


def _collect(artifacts: Path, trace, params: GenerationParams) -> dict:
    """Per step: guided action tokens, raw logits, audio tokens and (when found) each codebook head's logits."""
    manifest = load_manifest(artifacts)
    heads = _head_outputs(manifest.graph(DEPFORMER).path)
    limit = min(manifest.token_ids.audio_pad, manifest.token_ids.audio_bos)
    replay = Replay(artifacts, extra={DEPFORMER: heads} if heads else None)
    try:
        steps = list(replay.run(trace, params))
    finally:
        replay.close()
    action = np.stack([s.backbone["action_logits"].astype(np.float32) for s in steps])
    return {
        "action": action,
        "action_tokens": np.array([int(np.argmax(guide(a, params.cfg_scale, params.cfg_filter_k))) for a in action]),
        "cb0": np.stack([s.backbone["cb0_logits"].astype(np.float32) for s in steps]),
        "audio": np.stack([s.depformer["audio_tokens"] for s in steps]),
        # The depformer samples codebooks 1.. below min(pad, bos) only (the reference's vocab limit).
        "heads": [np.stack([s.depformer[h].astype(np.float32).reshape(2, -1)[:, :limit] for s in steps])
                  for h in heads],
    }


def _head_outputs(path: Path) -> list[str]:
    """The depformer's per-codebook logits tensors, found by the module scope the exporter records
    (every precision keeps these MatMuls; [] if a graph lost the scopes). A Loop's stages are
    unrolled first, as the Replay that fetches them does."""
    from .unroll import flat_graph

    model = flat_graph(path, load_external_data=False)
    found = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        match = _HEAD.search(scopes)
        if node.op_type == "MatMul" and match:
            found[int(match.group(1))] = node.output[0]
    return [found[i] for i in sorted(found)] if sorted(found) == list(range(len(found))) else []


def _compare(ref_logits, cand_logits, ref_tokens, cand_tokens, params: GenerationParams, mask=(),
             where=None) -> dict:
    """Top-1 agreement, logits error and confident agreement over the steps in ``where`` (all by default).

    A depformer codebook's ``where`` is the steps whose earlier codebooks agreed: the frame
    is one graph call, so its stages cannot be fed fp32's tokens, and only where the earlier
    ones agree is a stage's input fp32's (teacher forcing inside the frame). Over all steps
    (``frame_agreement``) one flip carries into every later codebook: on the random 2B
    checkpoint that took int8's cb31 to 0.006 while cb1 agreed 0.943.

    A step is confident when fp32's top-1 margin exceeds twice the largest logits
    error: the winner can lose at most that error and the runner-up gain as much,
    so only then can nothing but a defect flip it.
    """
    same = np.asarray(ref_tokens) == np.asarray(cand_tokens)
    where = np.ones(len(same), bool) if where is None else np.asarray(where, bool)
    result = {"agreement": float(same[where].mean()) if where.any() else None, "compared_steps": int(where.sum())}
    if not where.all():
        result["frame_agreement"] = float(same.mean())
    if ref_logits is None or not where.any():
        return result
    diff = np.abs(cand_logits[where].astype(np.float64) - ref_logits[where])
    error = float(diff.max())
    margins = np.array([_margin(step, params, mask) for step in ref_logits[where]])
    confident = margins > 2 * error
    result.update(max_abs=error, mean_abs=float(diff.mean()), confident_steps=int(confident.sum()),
                  confident_agreement=float(same[where][confident].mean()) if confident.any() else None)
    return result


def _margin(logits: np.ndarray, params: GenerationParams, mask) -> float:
    """Twice the smallest logits error that could change the pick (compared with 2 x the measured error).

    The sampler takes the best conditional logit among the guided top-k. With an error e on the
    logits the pick changes when the conditional top-2 among the kept swap (e >= margin / 2), when
    the winner falls out of the guided top-k, or when an entry outside enters it and beats the
    winner; the guided values' error is up to b = |w| + |1 - w| times e (guided = w * cond +
    (1 - w) * uncond). On the 2B topology fp16 flipped one cb21 step that the conditional margin
    alone called confident: an outside entry had crossed the boundary.
    """
    kept = guide(logits, params.cfg_scale, params.cfg_filter_k).copy()
    kept[list(mask)] = -np.inf
    finite = np.sort(kept[np.isfinite(kept)])
    flip = float(finite[-1] - finite[-2]) / 2 if finite.size > 1 else float("inf")
    w, k = params.cfg_scale, params.cfg_filter_k
    if w == 1.0 or k <= 0 or logits.ndim != 2 or logits.shape[1] <= k:
        return 2 * flip
    cond = logits[0].astype(np.float64)
    guided = w * cond + (1.0 - w) * logits[1].astype(np.float64)
    b = abs(w) + abs(1.0 - w)
    order = np.sort(guided)[::-1]
    kth, next_ = order[k - 1], order[k]
    winner = int(np.argmax(kept))
    flip = min(flip, (guided[winner] - next_) / (2 * b))  # the winner leaves the kept set
    outside = np.isfinite(cond) & ~np.isfinite(kept)
    outside[list(mask)] = False
    if outside.any():  # an outside entry enters and beats the winner: both must happen
        enter = (kth - guided[outside]) / (2 * b)
        beat = (cond[winner] - cond[outside]) / 2
        flip = min(flip, float(np.maximum(enter, beat).min()))
    return 2 * flip


def _failures(report: dict) -> list[str]:
    limits, failures = report["thresholds"], []
    for name, r in report["outputs"].items():
        enough = r["compared_steps"] >= MIN_COMPARED_STEPS
        if enough and r["agreement"] is not None and r["agreement"] < limits["agreement"]:
            failures.append(f"{name} agreement {r['agreement']:.3f} < {limits['agreement']}")
        confident = r.get("confident_agreement")
        if confident is not None and confident < limits["confident_agreement"]:
            failures.append(f"{name} confident agreement {confident:.3f} < {limits['confident_agreement']}")
    return failures


def summary_lines(report: dict) -> list[str]:
    lines = [f"[accuracy] {report['precision']} vs fp32 over {report['steps']} steps"]
    for name, r in report["outputs"].items():
        agreement = "n/a" if r["agreement"] is None else f"{r['agreement']:.3f}"
        line = f"  {name:>6}: top-1 {agreement} ({r['compared_steps']} steps)"
        if "frame_agreement" in r:
            line += f", over all steps {r['frame_agreement']:.3f}"
        if "max_abs" in r:
            conf = r["confident_agreement"]
            line += (f"  logits max {r['max_abs']:.2e} mean {r['mean_abs']:.2e}  confident "
                     f"{'n/a' if conf is None else f'{conf:.3f}'} ({r['confident_steps']} steps)")
        lines.append(line)
    return lines


def write_report(report: dict, path: Path) -> None:
    from dia2_trt.runtime.files import write_atomic

    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))


# --- parity diagnosis: a near-tie or a defect ---------------------------------------------------

# The largest |ONNX Runtime - torch| logits error, relative to the step's largest |logit|, that is
# still fp32 rounding: two fp32 evaluations of the same formulas in another op order (SDPA vs
# MatMul-Softmax-MatMul, MLAS vs MKL GEMM blocking, which also differs by instruction set) differ by
# a few ulps per op. Measured on the real-vocabulary checkpoint (seed 0, AVX-512 Xeon), 7 scripts,
# 24,651 decisions: worst 5.8e-6, median 5.3e-7; the cap leaves 17x for other CPUs' kernels. A
# defect (a wrong position, formula, dtype or filter) moves logits by 1e-2 relative or more.
ROUNDING_REL = 1e-4


@dataclass(frozen=True)
class Decision:
    """One greedy pick (text action or codebook) of one step, by torch and by the artifacts.

    ``channel`` is "action" or a codebook index; ``gap_torch`` / ``gap_ort`` the gaps between
    the top two guided logits (the candidates the pick chose among); ``error`` the largest
    |ORT - torch| over the step's raw CFG-pair logits; ``flip_margin`` (``_margin``) twice the
    smallest logits error that could change torch's pick. A near-tie: the error is fp32
    rounding and at least half the flip margin, so rounding alone can flip the pick.
    """

    step: int
    channel: str | int
    torch_token: int
    ort_token: int
    gap_torch: float
    gap_ort: float
    error: float
    scale: float
    flip_margin: float

    @property
    def agree(self) -> bool:
        return self.torch_token == self.ort_token

    @property
    def rounding(self) -> bool:
        return self.error <= ROUNDING_REL * self.scale

    @property
    def near_tie(self) -> bool:
        return self.rounding and self.flip_margin <= 2 * self.error

    def describe(self) -> str:
        where = f"step {self.step} {'action' if self.channel == 'action' else f'codebook {self.channel}'}"
        numbers = (f"torch picks {self.torch_token}, ONNX Runtime {self.ort_token}; top-2 guided gap "
                   f"torch {self.gap_torch:.3g}, ORT {self.gap_ort:.3g}; |ORT - torch| {self.error:.3g} "
                   f"(logits up to {self.scale:.3g}); flip margin {self.flip_margin:.3g}")
        if self.agree:
            return f"agreement at {where}: {numbers}"
        if self.near_tie:
            return f"near-tie at {where} (flip margin {self.flip_margin:.3g} < 2 x rounding error): {numbers}"
        return f"defect at {where} (flip margin {self.flip_margin:.3g}): {numbers}"


def first_divergence(artifacts: Path, loop, script: str, params: GenerationParams = GREEDY) -> Decision | None:
    """The first decision of the PyTorch reference's greedy run that the artifacts pick otherwise.

    Up to that decision every input is the reference's, so it is also where a free-running
    ``speak`` first departs. None: the artifacts pick as torch does at every step.
    """
    return next((d for d in decisions(artifacts, loop, script, params) if not d.agree), None)


def decisions(artifacts: Path, loop, script: str, params: GenerationParams = GREEDY):
    """Teacher-force the artifacts through the PyTorch reference's greedy run (``loop``: a
    models.reference.ReferenceLoop) and yield every decision of every step, in the order they
    are taken (action, cb0, cb1 ...), up to and including the first one the two pick otherwise
    (past it a codebook's inputs are no longer the reference's)."""
    trace, logits = _reference_trace(loop, script, params)
    manifest = load_manifest(artifacts)
    heads = _head_outputs(manifest.graph(DEPFORMER).path)
    if not heads:
        raise ValueError(f"{artifacts}: the depformer's codebook logits cannot be found")
    special = [manifest.token_ids.audio_pad, manifest.token_ids.audio_bos]
    replay = Replay(Path(artifacts), extra={DEPFORMER: heads})
    try:
        for t, step in enumerate(replay.run(trace, params)):
            for decision in _step_decisions(t, step, heads, logits[t], params, special):
                yield decision
                if not decision.agree:
                    return
    finally:
        replay.close()


def _reference_trace(loop, script: str, params: GenerationParams):
    """The reference's greedy run as a Trace, and per step its raw logits {channel: [2, V]}."""
    from .replay import Trace

    tokens, logits = [], []

    def observe(t, what, tensor):
        if what == "tokens":
            tokens.append(tensor.numpy().copy())
            logits.append({})
        else:
            logits[t][what] = tensor.float().reshape(2, -1).numpy().copy()

    result = loop.run(script, params, observe=observe)
    steps = len(result.text_tokens)
    audio = result.delayed[:, 1:steps + 1].T
    return Trace(script, np.stack(tokens[:steps]), np.array(result.text_tokens), audio), logits[:steps]


def _step_decisions(t, step, heads, torch_logits, params, special):
    ort = {"action": step.backbone["action_logits"], 0: step.backbone["cb0_logits"]}
    ort.update({q + 1: step.depformer[h] for q, h in enumerate(heads)})
    ort_audio = step.depformer["audio_tokens"]
    for channel in ["action", *range(len(heads) + 1)]:
        ref = torch_logits[channel]
        cand = np.asarray(ort[channel], np.float32).reshape(2, -1)[:, :ref.shape[1]]
        mask = special if channel == 0 else []
        torch_pick = _pick(ref, params, mask)
        ort_pick = _pick(cand, params, mask) if channel == "action" else int(ort_audio[channel])
        yield Decision(t, channel, torch_pick, ort_pick, _gap(ref, params, mask), _gap(cand, params, mask),
                       float(np.abs(cand.astype(np.float64) - ref).max()), float(np.abs(ref).max()),
                       _margin(ref, params, mask))


def _guided(logits: np.ndarray, params: GenerationParams, mask) -> np.ndarray:
    kept = guide(logits, params.cfg_scale, params.cfg_filter_k).copy()
    kept[list(mask)] = -np.inf
    return kept


def _pick(logits: np.ndarray, params: GenerationParams, mask) -> int:
    return int(np.argmax(_guided(logits, params, mask)))


def _gap(logits: np.ndarray, params: GenerationParams, mask) -> float:
    kept = _guided(logits, params, mask)
    finite = np.sort(kept[np.isfinite(kept)])
    return float(finite[-1] - finite[-2]) if finite.size > 1 else float("inf")
