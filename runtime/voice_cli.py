"""CLI pieces for audio prefixes: ``dia2-rt speak``'s prefix options and ``dia2-rt voice create``."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from .voice import VoiceError, load_voice, save_voice

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


def check_prefix_args(a: dict) -> None:
    """Flag combinations that cannot work, before anything slow is loaded (VoiceError)."""
    if a["turn"] and (a["prefix_1"] or a["voice_1"]):
        raise VoiceError("--prefix-turn is speaker 1's prefix: drop --prefix-speaker-1/--voice-1")
    if a["turn"] and not Path(a["turn"]).is_file():
        raise VoiceError(f"{a['turn']}: no such file")
    for slot in (1, 2):
        if a[f"prefix_{slot}"] and a[f"voice_{slot}"]:
            raise VoiceError(f"give speaker {slot}'s prefix as --prefix-speaker-{slot} or --voice-{slot}, not both")
        if a[f"words_{slot}"] and not a[f"prefix_{slot}"]:
            raise VoiceError(f"--prefix-words-{slot} needs --prefix-speaker-{slot}")
        for key in (f"prefix_{slot}", f"words_{slot}", f"voice_{slot}"):
            if a[key] and not Path(a[key]).is_file():
                raise VoiceError(f"{a[key]}: no such file")
    if (a["prefix_2"] or a["voice_2"]) and not (a["prefix_1"] or a["voice_1"] or a["turn"]):
        raise VoiceError("a speaker 2 prefix needs a speaker 1 prefix too (as in the reference)")
    if a["include_prefix"] and not (a["prefix_1"] or a["voice_1"] or a["turn"]):
        raise VoiceError("--include-prefix needs a prefix (--prefix-speaker-1 or --voice-1)")


def load_prefix(runtime, a: dict):
    """The Prefix the options describe, or None. Raises VoiceError/AudioError."""
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
    return runtime.prefix(*voices, include_audio=a["include_prefix"])


def _turn_voice(runtime, path: Path):
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        tokens, stamps = raw["tokens"], [(str(w), float(s)) for w, s in raw["timestamps"]]
        import numpy as np

        codes = np.asarray(tokens, dtype=np.int64)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VoiceError(f"{path}: not a --tokens-out file ({str(exc).splitlines()[0] if str(exc) else exc})") \
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
    from .engine import Dia2Runtime

    if Path(out).suffix != ".voice":
        fail(f"{out}: a voice file's name must end in .voice")
    out = check_outputs({"--out": out}, protected=[("artifact directory", Path(artifacts))])["--out"]
    if words and not Path(words).is_file():
        raise VoiceError(f"{words}: no such file")
    args = {"whisper_model": whisper_model, "whisper_device": whisper_device}
    # VoiceError, AudioError and ArtifactError are ValueErrors: dia2-rt's group makes each one line.
    runtime = Dia2Runtime.load(artifacts)
    made = runtime.voice(audio, words, speaker, _transcriber(args))
    runtime.check_prefix_frames(made.frames)
    save_voice(made, out)
    click.echo(f"{out}: speaker {speaker}, {made.frames} frames ({made.frames / runtime.manifest.frame_rate:.2f} s), "
               f"{len(made.words)} words", err=True)
