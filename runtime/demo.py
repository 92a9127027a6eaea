"""``dia2-rt demo``: the reference's Gradio app (nari-labs/dia2 ``gradio_app.py``) on the torch-free runtime.

The same controls (a script, a voice for each speaker from an uploaded clip or a saved
``.voice`` file, include-prefix, seed, text and audio temperature and top-k, CFG scale),
the word timestamps as they are generated, and a WAV to download. Audio plays while it is
generated where ffmpeg is installed (Gradio encodes a streamed output with it); without
ffmpeg the whole utterance appears at the end, and the page says why.

A named API endpoint ``/speak`` takes ``(text, seed, temperature, cfg_scale)`` and returns a
16-bit WAV with exactly the samples of ``dia2-rt speak --out -`` for the same options, so
``gradio_client`` can drive it. Gradio is imported only when the command runs (extra ``[demo]``).
"""

from __future__ import annotations

import io
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from .audio import pcm16
from .backends import BACKEND_NAMES
from .cli_common import threads_option
from .params import GenerationParams

EXAMPLE = "[S1] Hello there, welcome to Dia2 on the torch-free runtime. [S2] It streams as it speaks."
AUDIO_TYPES = [".wav", ".flac", ".ogg", ".mp3", ".voice"]
INT64_MAX = 2**63 - 1


class DemoError(ValueError):
    """A request the demo refuses: one line, shown on the page."""


# --- what a request turns into (no gradio here: the tests call these directly too) ------------------


def params_from(seed, text_temperature, audio_temperature, text_top_k, audio_top_k, cfg_scale) -> GenerationParams:
    """The UI's numbers as GenerationParams, through ``from_options`` as ``dia2-rt speak`` builds them."""
    base = GenerationParams.from_options(seed=_whole(seed, "seed"), text_temperature=_real(text_temperature),
                                         audio_temperature=_real(audio_temperature),
                                         top_k=_whole(text_top_k, "text top-k"), cfg_scale=_cfg(cfg_scale))
    from dataclasses import replace

    return replace(base, audio_top_k=_whole(audio_top_k, "audio top-k"))


def speak_params(seed, temperature, cfg_scale) -> GenerationParams:
    """``/speak``'s options: ``--seed``, ``--temperature`` (None: the defaults) and ``--cfg`` of ``speak``."""
    return GenerationParams.from_options(seed=_whole(seed, "seed"), temperature=_real(temperature),
                                         cfg_scale=_cfg(cfg_scale))


def _whole(value, what: str) -> int:
    # Gradio's Number gives floats (3.0); a fraction or a huge value is the user's typo, not a seed.
    if value is None:
        return 0
    number = float(value)
    if not number.is_integer() or not 0 <= number <= INT64_MAX:
        raise DemoError(f"{what} must be a whole number from 0 to 2^63-1, got {value}")
    return int(number)


def _cfg(value) -> float:
    scale = _real(value)
    return 2.0 if scale is None else scale


def _real(value) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    if not np.isfinite(number):
        raise DemoError(f"{value} is not a finite number")
    return number


def wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit WAV of ``pcm``, rounded as every runtime output is (``audio.pcm16``)."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.frombuffer(pcm16(pcm), dtype="<i2"), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class Voices:
    """Saved ``.voice`` files by name (``--voice NAME=FILE``, checked at startup) and uploads made into voices."""

    def __init__(self, runtime, options: list[str]) -> None:
        from .serve.voices import VoiceRegistry
        from .voice import load_voice

        def load(path):
            voice = load_voice(path)
            runtime.prefix(voice)  # refuses a voice made for other artifacts, or too long for the context
            return voice

        self.runtime = runtime
        self.registry = VoiceRegistry.from_options(options, loader=load)

    def names(self) -> list[str]:
        return [name for name in self.registry.names() if self.registry.resolve(name).conditioned]

    def pick(self, slot: int, upload: str | None, words: str | None, saved: str | None):
        """Speaker ``slot``'s voice: an upload (a clip, with its words JSON, or a .voice file) before a saved one."""
        from .voice import load_voice

        if upload:
            if Path(upload).suffix.lower() == ".voice":
                return load_voice(upload)
            return self.runtime.voice(upload, words or None, slot, _transcriber())
        if saved:
            return self.registry.resolve(saved).prefix
        return None

    def prefix(self, uploads: tuple, words: tuple, saved: tuple, include_prefix: bool):
        voices = [self.pick(slot, uploads[slot - 1], words[slot - 1], saved[slot - 1]) for slot in (1, 2)]
        if voices[1] is not None and voices[0] is None:
            raise DemoError("speaker 2's voice needs a voice for speaker 1 too (as in Dia2)")
        return self.runtime.prefix(*voices, include_prefix=bool(include_prefix))


def _transcriber():
    """faster-whisper for clips without word timings, loaded only if one comes (extra [transcribe])."""
    def run(path: Path, duration: float):
        try:
            from .transcribe import load_model, transcribe
        except ImportError as exc:
            raise DemoError(f"a clip without its words JSON needs faster-whisper "
                            f"(pip install 'dia2-trt[transcribe]'): {exc}") from None
        return transcribe(load_model("large-v3", "auto"), path, duration)

    return run


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- the page -----------------------------------------------------------------------------------------


class Demo:
    """The Gradio app over one loaded runtime; ``build()`` makes the Blocks."""

    def __init__(self, runtime, voices: Voices, out_dir: Path) -> None:
        self.runtime = runtime
        self.voices = voices
        self.out_dir = out_dir
        self.streams = shutil.which("ffmpeg") is not None

    def _write(self, data: bytes) -> str:
        handle, name = tempfile.mkstemp(suffix=".wav", prefix="dia2-", dir=self.out_dir)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return name

    def speak(self, text, seed, temperature, cfg_scale) -> str:
        """``/speak``: the WAV of ``dia2-rt speak TEXT --seed --temperature --cfg``."""
        import gradio as gr

        try:
            result = self.runtime.speak(text or "", speak_params(seed, temperature, cfg_scale))
        except (ValueError, TypeError) as exc:  # ScriptError, DemoError, a parameter out of range
            raise gr.Error(one_line(exc)) from None
        return self._write(wav_bytes(result.pcm, result.sample_rate))

    def generate(self, script, upload_1, words_1, saved_1, upload_2, words_2, saved_2, include_prefix, seed,
                 text_temperature, audio_temperature, text_top_k, audio_top_k, cfg_scale):
        """The page's Generate: audio chunks (streamed where ffmpeg is), the words so far, then the download."""
        import gradio as gr

        try:
            params = params_from(seed, text_temperature, audio_temperature, text_top_k, audio_top_k, cfg_scale)
            prefix = self.voices.prefix((upload_1, upload_2), (words_1, words_2), (saved_1, saved_2), include_prefix)
            session = self.runtime.stream(script or "", params, prefix=prefix)
        except (ValueError, TypeError, OSError) as exc:  # ScriptError, VoiceError, AudioError, DemoError...
            raise gr.Error(one_line(exc)) from None
        pcm, words = [], []
        try:
            for chunk in session:
                pcm.append(chunk.pcm)
                words.extend(chunk.words)
                audio = wav_bytes(chunk.pcm, chunk.sample_rate) if self.streams and chunk.pcm.size else gr.skip()
                yield audio, _table(words), gr.skip(), f"generating: {len(words)} words, " \
                    f"{sum(p.size for p in pcm) / chunk.sample_rate:.1f} s of audio"
        finally:
            if not session.done:
                session.cancel()  # the page went away mid-utterance: stop at the next frame
        whole = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
        path = self._write(wav_bytes(whole, self.runtime.sample_rate))
        result = session.result
        note = f"done: {len(words)} words, {whole.size / self.runtime.sample_rate:.2f} s"
        if result is not None and result.truncated:
            note += " (truncated: the script did not fit the model's context)"
        yield (gr.skip() if self.streams else path), _table(words), path, note

    def build(self):
        import gradio as gr

        with gr.Blocks(title="Dia2 (dia2-trt)", analytics_enabled=False, delete_cache=(600, 3600)) as blocks:
            gr.Markdown("## Dia2 on the torch-free runtime\nWrite a dialogue with `[S1]` / `[S2]` turns "
                        "(text without a tag is speaker 1), give each speaker a voice if you like, and generate."
                        + ("" if self.streams else "\n\n*ffmpeg is not installed: the audio appears when the "
                                                   "utterance is complete (install ffmpeg to hear it as it is "
                                                   "generated).*"))
            with gr.Row():
                with gr.Column():
                    script = gr.Textbox(EXAMPLE, label="Script", lines=5, elem_id="script")
                    inputs = self._voice_inputs(gr) + self._sampling_inputs(gr)
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    audio = gr.Audio(label="Audio", streaming=self.streams, autoplay=True, interactive=False,
                                     elem_id="audio")
                    status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                    words = gr.Dataframe(headers=["word", "seconds"], label="Word timestamps", elem_id="words",
                                         interactive=False)
                    download = gr.File(label="Download (WAV)", interactive=False, elem_id="download")
            button.click(self.generate, [script, *inputs], [audio, words, download, status], api_name="generate")
            self._api(gr)
        return blocks

    def _voice_inputs(self, gr) -> list:
        out = []
        names = self.voices.names()
        with gr.Accordion("Voices (optional)", open=True):
            for slot in (1, 2):
                with gr.Row():
                    out.append(gr.File(label=f"[S{slot}] voice: audio clip or .voice file", file_types=AUDIO_TYPES,
                                       type="filepath", elem_id=f"voice-{slot}"))
                    out.append(gr.File(label=f"[S{slot}] clip's words JSON (else faster-whisper)",
                                       file_types=[".json"], type="filepath", elem_id=f"words-{slot}"))
                    out.append(gr.Dropdown([None, *names], value=None, label=f"[S{slot}] saved voice",
                                           visible=bool(names), elem_id=f"saved-{slot}"))
            out.append(gr.Checkbox(False, label="Keep the prefix audio in the output", elem_id="include-prefix"))
        return out

    def _sampling_inputs(self, gr) -> list:
        d = GenerationParams()
        with gr.Accordion("Sampling", open=False):
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
            with gr.Row():
                text_t = gr.Slider(0, 1.5, d.text_temperature, step=0.05, label="Text temperature")
                audio_t = gr.Slider(0, 1.5, d.audio_temperature, step=0.05, label="Audio temperature")
            with gr.Row():
                text_k = gr.Slider(0, 200, d.text_top_k, step=1, label="Text top-k (0: none)")
                audio_k = gr.Slider(0, 200, d.audio_top_k, step=1, label="Audio top-k (0: none)")
            cfg = gr.Slider(1.0, 8.0, d.cfg_scale, step=0.1, label="CFG scale (1: off)")
        return [seed, text_t, audio_t, text_k, audio_k, cfg]

    def _api(self, gr) -> None:
        """``/speak`` for gradio_client: hidden inputs, one audio output, no UI of its own."""
        with gr.Row(visible=False):
            text = gr.Textbox()
            seed, temperature, cfg = gr.Number(0, precision=0), gr.Number(None), gr.Number(2.0)
            out = gr.Audio(type="filepath", format="wav")
        gr.Button(visible=False).click(self.speak, [text, seed, temperature, cfg], out, api_name="speak")


def _table(words: list[tuple[str, float]]) -> list[list[Any]]:
    return [[word, round(seconds, 3)] for word, seconds in words]


# --- the command ------------------------------------------------------------------------------------


@click.command()
@click.option("--artifacts", required=True, type=click.Path(), help="Artifact directory (dia2-export build).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535))
@click.option("--voice", "voice_options", multiple=True, metavar="NAME=FILE",
              help="A saved .voice file (dia2-rt voice create) offered by name on the page (repeatable).")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Utterances generated at once (sessions on one loaded runtime).")
@threads_option()
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKEND_NAMES))
def demo(artifacts, host, port, voice_options, concurrency, threads, backend) -> None:
    """A Gradio page for Dia2 (the reference's app), with a /speak API for gradio_client."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"dia2-rt demo needs the [demo] extra (pip install 'dia2-trt[demo]'): {exc}") \
            from None
    runtime = _load(artifacts, backend, threads)
    try:
        voices = Voices(runtime, list(voice_options))
    except ValueError as exc:
        raise click.ClickException(one_line(exc)) from None
    if not _loopback(host):
        click.echo(f"warning: serving the demo on {host}, reachable from other machines, with no authentication",
                   err=True)
    out_dir = Path(tempfile.mkdtemp(prefix="dia2-demo-"))
    try:  # Ctrl-C and SIGTERM arrive as exceptions (runtime.signals): the WAVs go with the process
        blocks = Demo(runtime, voices, out_dir).build()
        blocks.queue(default_concurrency_limit=concurrency)
        blocks.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                      allowed_paths=[str(out_dir)], quiet=False)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # ours: made just above


def _load(artifacts: str, backend: str, threads: int | None):
    import warnings

    from . import ArtifactError, Dia2Runtime, TruncationWarning

    warnings.simplefilter("ignore", TruncationWarning)  # the page's status line says truncated
    try:
        return Dia2Runtime.load(artifacts, backend=backend, threads=threads)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from None
    except (ImportError, ValueError) as exc:
        raise click.ClickException(f"backend {backend} cannot run here: {exc}") from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
