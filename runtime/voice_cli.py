"""CLI pieces for audio prefixes: ``dia2-rt speak``'s prefix options and ``dia2-rt voice create``."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .audio import AudioError, audio_info
from .errors import first_line
from .files import InputFileError, check_regular, read_json_file
from .voice import VoiceError, load_voice, read_words, save_voice

# A --tokens-out file: [channels, frames] small integers; the 2B's longest utterance is ~0.3 MB.
MAX_TURN_BYTES = 16 << 20

_OPTIONS = [
    click.option("--prefix-speaker-1", "prefix_1", type=click.Path(dir_okay=False),
                 help="Audio whose voice speaker 1 continues (any file soundfile reads)."),
    click.option("--prefix-speaker-2", "prefix_2", type=click.Path(dir_okay=False),
                 help="Audio for speaker 2 (needs a speaker 1 prefix, as in the reference)."),
    click.option("--prefix-words-1", "words_1", type=click.Path(dir_okay=False),
                 help='Word timings of --prefix-speaker-1: JSON [{"word", "start", "end"}] (else transcribed).'),
    click.option("--prefix-words-2", "words_2", type=click.Path(dir_okay=False),
                 help="Word timings of --prefix-speaker-2."),
    click.option("--voice-1", "voice_1", type=click.Path(dir_okay=False),
                 help="A .voice file (dia2-rt voice create) for speaker 1, instead of --prefix-speaker-1."),
    click.option("--voice-2", "voice_2", type=click.Path(dir_okay=False), help="A .voice file for speaker 2."),
    click.option("--prefix-turn", "turn", type=click.Path(dir_okay=False),
                 help="A previous utterance's --tokens-out JSON as speaker 1's prefix (conversation turns)."),
    click.option("--include-prefix", is_flag=True, help="Keep the prefix audio (and its words) in the output."),
    click.option("--step-warmup", is_flag=True,
                 help="Warm up on the prefix frame by frame instead of with the prefill graph."),
    click.option("--whisper-model", default="large-v3", show_default=True,
                 help="faster-whisper model (name or path) for prefixes without word timings."),
    click.option("--whisper-device", default="auto", show_default=True, help="faster-whisper device."),
]


def prefix_options(command):
    """Add the prefix options; they reach the command as one ``prefix_args`` dict."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        names = ("prefix_1", "prefix_2", "words_1", "words_2", "voice_1", "voice_2", "turn", "include_prefix",
                 "step_warmup", "whisper_model", "whisper_device")
        prefix_args = {name: kwargs.pop(name) for name in names}
        return command(*args, prefix_args=prefix_args, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def prefix_inputs(a: dict) -> list[tuple[str, str | None]]:
    """(label, path) of every file the prefix options read: no output may be one of them."""
    labels = {"turn": "--prefix-turn file"}
    for slot in (1, 2):
        labels.update({f"prefix_{slot}": f"--prefix-speaker-{slot} audio", f"words_{slot}": f"--prefix-words-{slot} "
                       "file", f"voice_{slot}": f"--voice-{slot} file"})
    return [(label, a[key]) for key, label in labels.items()]


def check_prefix_args(a: dict) -> None:
    """Flag combinations that cannot work and files that cannot be read (wrong type, too large,
    malformed), before anything slow is loaded (VoiceError, AudioError)."""
    if a["turn"] and (a["prefix_1"] or a["voice_1"]):
        raise VoiceError("--prefix-turn is speaker 1's prefix: drop --prefix-speaker-1/--voice-1")
    for slot in (1, 2):
        if a[f"prefix_{slot}"] and a[f"voice_{slot}"]:
            raise VoiceError(f"give speaker {slot}'s prefix as --prefix-speaker-{slot} or --voice-{slot}, not both")
        if a[f"words_{slot}"] and not a[f"prefix_{slot}"]:
            raise VoiceError(f"--prefix-words-{slot} needs --prefix-speaker-{slot}")
    if (a["prefix_2"] or a["voice_2"]) and not (a["prefix_1"] or a["voice_1"] or a["turn"]):
        raise VoiceError("a speaker 2 prefix needs a speaker 1 prefix too (as in the reference)")
    if a["include_prefix"] and not (a["prefix_1"] or a["voice_1"] or a["turn"]):
        raise VoiceError("--include-prefix needs a prefix (--prefix-speaker-1 or --voice-1)")
    if a["turn"]:
        read_turn(a["turn"])
    for slot in (1, 2):
        if a[f"prefix_{slot}"]:
            audio_info(a[f"prefix_{slot}"])  # type, size and length from the header; nothing decoded
        if a[f"words_{slot}"]:
            check_words(a[f"words_{slot}"])
        if a[f"voice_{slot}"]:
            _check_file(a[f"voice_{slot}"], "voice file")


def _check_file(path: str, what: str) -> None:
    try:
        check_regular(path, what)
    except InputFileError as exc:
        raise VoiceError(str(exc)) from None


def check_words(path: str | Path) -> None:
    """A words file, bounded and well-formed, checked before the artifacts load (they read it again)."""
    read_words(path)


def read_turn(path: str | Path) -> tuple[list, list[tuple[str, float]]]:
    """(tokens, timestamps) of a --tokens-out file, bounded and well-formed."""
    try:
        raw = read_json_file(path, MAX_TURN_BYTES, "--prefix-turn file")
        tokens, stamps = raw["tokens"], [(str(w), float(s)) for w, s in raw["timestamps"]]
        if not isinstance(tokens, list):
            raise TypeError("tokens is not a list")
    except InputFileError as exc:
        raise VoiceError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise VoiceError(f"{path}: not a --tokens-out file ({first_line(exc)})") \
            from None
    return tokens, stamps


def check_prefix_audio(runtime, a: dict) -> None:
    """Each prefix audio no longer than these artifacts can hold, from its header, before decoding."""
    m = runtime.manifest
    # The room is cache_capacity - 1 frames; one frame more allows for resampling's rounding
    # (Dia2Runtime.voice checks the exact frame count once the audio is decoded).
    limit = m.cache_capacity / m.frame_rate
    for slot in (1, 2):
        if a[f"prefix_{slot}"]:
            try:
                audio_info(a[f"prefix_{slot}"], max_seconds=limit)
            except AudioError as exc:
                raise AudioError(f"{exc} for these artifacts (rebuild them with a larger --prefix-frames)") from None


def load_prefix(runtime, a: dict):
    """The Prefix the options describe, or None. Raises VoiceError/AudioError."""
    check_prefix_audio(runtime, a)
    voices = []
    for slot in (1, 2):
        if slot == 1 and a["turn"]:
            voices.append(_turn_voice(runtime, Path(a["turn"])))
        elif a[f"voice_{slot}"]:
            voices.append(load_voice(a[f"voice_{slot}"]))
        elif a[f"prefix_{slot}"]:
            voices.append(runtime.voice(a[f"prefix_{slot}"], a[f"words_{slot}"], slot, _transcriber(a)))
        else:
            voices.append(None)
    return runtime.prefix(*voices, include_prefix=a["include_prefix"])


def _turn_voice(runtime, path: Path):
    import numpy as np

    tokens, stamps = read_turn(path)
    try:
        codes = np.asarray(tokens, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise VoiceError(f"{path}: not a --tokens-out file ({first_line(exc)})") \
            from None
    return runtime.turn_voice(codes, stamps, 1)


def _transcriber(a: dict):
    """Load faster-whisper only when a prefix actually lacks word timings."""
    def run(path: Path, duration: float):
        from .transcribe import load_model, transcribe

        return transcribe(load_model(a["whisper_model"], a["whisper_device"]), path, duration)

    return run




@click.group()
def voice() -> None:
    """Reusable voices: a speaker's prefix, encoded and tokenised once."""


@voice.command("create")
@click.argument("audio", type=click.Path(dir_okay=False))
@click.option("--artifacts", required=True, type=click.Path(), help="Artifact directory the voice is for.")
@click.option("--speaker", required=True, type=click.IntRange(1, 2), help="Speaker slot the words are tagged for.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="NAME.voice to write.")
@click.option("--words", type=click.Path(dir_okay=False), help='Word timings JSON [{"word", "start", "end"}].')
@click.option("--whisper-model", default="large-v3", show_default=True)
@click.option("--whisper-device", default="auto", show_default=True)
def create(audio, artifacts, speaker, out, words, whisper_model, whisper_device) -> None:
    """Encode AUDIO and its words into a .voice file for dia2-rt speak --voice-1/--voice-2."""
    from .cli_common import check_outputs, fail
    from .runtime import Dia2Runtime

    if Path(out).suffix != ".voice":
        fail(f"{out}: a voice file's name must end in .voice")
    out = check_outputs({"--out": out}, protected=[("artifact directory", Path(artifacts))],
                        inputs=[("AUDIO", audio), ("--words file", words)])["--out"]
    audio_info(audio)
    if words:
        check_words(words)
    args = {"whisper_model": whisper_model, "whisper_device": whisper_device}
    # VoiceError, AudioError and ArtifactError are ValueErrors: dia2-rt's group makes each one line.
    runtime = Dia2Runtime.load(artifacts)
    check_prefix_audio(runtime, {"prefix_1": audio, "prefix_2": None})
    made = runtime.voice(audio, words, speaker, _transcriber(args))
    runtime.check_prefix_frames(made.frames)
    save_voice(made, out)
    click.echo(f"{out}: speaker {speaker}, {made.frames} frames ({made.frames / runtime.manifest.frame_rate:.2f} s), "
               f"{len(made.words)} words", err=True)
