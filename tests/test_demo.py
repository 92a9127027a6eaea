"""``dia2-rt demo`` (Gradio) on the committed tiny fixture: a real demo process on a loopback port.

``gradio_client``'s ``/speak`` must return exactly the samples of ``dia2-rt speak --out -`` with the
same text, seed, temperature and CFG scale; a bad script is one line. A headless chromium then
drives the page as a user would: uploads a voice clip and its words, generates, and the audio
plays and the words are listed; the screenshot stays in the test's tmp dir (and is copied to
``$DIA2_DEMO_SCREENSHOT`` when that is set). Without gradio the tests skip and say which extra.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="needs the [demo] extra (pip install 'dia2-trt[demo]')")
gradio_client = pytest.importorskip("gradio_client", reason="needs the [demo] extra (gradio_client)")

from serve_support import free_port, headless_chromium, wait_until  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "tiny-artifacts"
VOICES = DATA / "voices"
SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."
STARTUP_SECONDS = 120.0  # importing gradio alone takes 5-15 s on a busy 2-core machine


def _wait_for(url: str, process: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dia2-rt demo exited with {process.returncode}: {process.stdout.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("dia2-rt demo did not start in time")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo as a user starts it, with a saved voice offered by name; stopped at the end."""
    from dia2_trt.runtime import Dia2Runtime
    from dia2_trt.runtime.voice import save_voice

    voice = tmp_path_factory.mktemp("voices") / "anna.voice"
    runtime = Dia2Runtime.load(FIXTURE, threads=1)
    save_voice(runtime.voice(VOICES / "s1_24k_mono.flac", VOICES / "s1_24k_mono.words.json", 1), voice)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dia2_trt.runtime", "demo", "--artifacts", str(FIXTURE), "--port", str(port),
         "--threads", "1", "--voice", f"anna={voice}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))})
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cli_pcm(text: str, *options: str) -> bytes:
    done = subprocess.run([sys.executable, "-m", "dia2_trt.runtime", "speak", "--artifacts", str(FIXTURE),
                           "--out", "-", "--quiet", "--threads", "1", *options, text], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.parametrize("text, seed, temperature, cfg", [
    (SCRIPT, 7, 0.7, 1.5),
    ("Hello there, how are you? I am fine, thanks.", 0, 0.0, 2.0),  # untagged: speaker 1, as the reference
])
def test_speak_endpoint_equals_the_cli(demo, text, seed, temperature, cfg):
    import soundfile as sf

    client = gradio_client.Client(demo, verbose=False)
    path = client.predict(text, seed, temperature, cfg, api_name="/speak")
    audio, rate = sf.read(path, dtype="int16")
    expected = _cli_pcm(text, "--seed", str(seed), "--temperature", str(temperature), "--cfg", str(cfg))
    assert rate == 24000 and len(expected) > 4800
    assert audio.astype("<i2").tobytes() == expected


def test_speak_endpoint_refuses_a_bad_script_in_one_line(demo):
    client = gradio_client.Client(demo, verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError) as refused:
        client.predict("[S1] Hello <laugh> there", 0, 0.0, 2.0, api_name="/speak")
    message = str(refused.value)
    assert "unknown tag" in message and "\n" not in message


@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "profile", window="1280,1400", page_timeout=60) as driver:
        yield driver


# Gradio's player (wavesurfer) keeps its media element out of the DOM: it is playing when its Pause
# button shows and its clock has moved.
_PLAYER = """
const player = document.querySelector('#audio');
const text = id => (player.querySelector('time#' + id) || {}).textContent;
const labels = Array.from(player.querySelectorAll('button')).map(b => b.getAttribute('aria-label'));
return {time: text('time'), duration: text('duration'), playing: labels.includes('Pause')};
"""


def test_page_uploads_a_voice_generates_plays_and_lists_words(demo, browser, tmp_path):
    import httpx
    import soundfile as sf
    from selenium.webdriver.common.by import By

    from dia2_trt.runtime import Dia2Runtime, GenerationParams
    from dia2_trt.runtime.audio import pcm16

    runtime = Dia2Runtime.load(FIXTURE, threads=1)
    prefix = runtime.prefix(runtime.voice(VOICES / "s1_24k_mono.flac", VOICES / "s1_24k_mono.words.json", 1))
    expected = runtime.speak(SCRIPT, GenerationParams(), prefix=prefix)

    browser.get(demo)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#script textarea"), 60)
    script = browser.find_element(By.CSS_SELECTOR, "#script textarea")
    script.clear()
    script.send_keys(SCRIPT)
    browser.find_element(By.CSS_SELECTOR, "#voice-1 input[type=file]").send_keys(str(VOICES / "s1_24k_mono.flac"))
    browser.find_element(By.CSS_SELECTOR, "#words-1 input[type=file]").send_keys(
        str(VOICES / "s1_24k_mono.words.json"))
    # An upload is done when the component lists its file (a name link replaces the drop zone).
    for slot in ("voice-1", "words-1"):
        wait_until(lambda slot=slot: browser.find_elements(By.CSS_SELECTOR, f"#{slot} a, #{slot} .file-name"), 30)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    status = lambda: browser.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value")  # noqa: E731
    wait_until(lambda: status().startswith("done"), 120)
    state = wait_until(lambda: (p := browser.execute_script(_PLAYER)) and p["playing"] and p["time"] != "0:00" and p,
                       30)
    table = browser.find_element(By.ID, "words").text.split()
    browser.save_screenshot(str(tmp_path / "demo-page.png"))
    if os.environ.get("DIA2_DEMO_SCREENSHOT"):
        shutil.copyfile(tmp_path / "demo-page.png", os.environ["DIA2_DEMO_SCREENSHOT"])
    words = [word for word, _ in expected.timestamps]
    seconds = expected.audio_seconds
    assert state["duration"] in (f"{int(seconds) // 60}:{int(seconds) % 60:02d}",
                                 f"{round(seconds) // 60}:{round(seconds) % 60:02d}")
    rows = table[table.index("seconds") + 1:]  # after the label and the "word seconds" header
    shown = [(word, float(seconds)) for word, seconds in zip(rows[::2], rows[1::2])]
    assert shown == [(word, round(seconds, 3)) for word, seconds in expected.timestamps]
    assert status() == f"done: {len(words)} words, {seconds:.2f} s"
    links = browser.find_elements(By.CSS_SELECTOR, "#download a")
    assert links and links[0].get_attribute("href").endswith(".wav")
    downloaded, rate = sf.read(io.BytesIO(httpx.get(links[0].get_attribute("href"), timeout=30).content),
                               dtype="int16")
    assert rate == 24000 and downloaded.astype("<i2").tobytes() == pcm16(expected.pcm)
    assert (tmp_path / "demo-page.png").stat().st_size > 1000
