"""The page at / in a real headless browser: Debian's chromium, driven through /usr/bin/chromedriver.

Loads the page, submits a script, and checks that audio arrived and played through Web Audio
and that the words appeared and lit up; a screenshot is kept in the test's tmp dir.
Selenium Manager never runs (the driver path is given and SE_OFFLINE is set), so nothing is
downloaded; without chromium the test skips and says so (.ci/run installs it).
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the [serve-test] extra (selenium)")

from dia2_trt.runtime import GenerationParams  # noqa: E402
from dia2_trt.runtime.serve.app import create_app  # noqa: E402

from serve_support import headless_chromium, live_server, wait_until  # noqa: E402

SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."

@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "profile") as driver:
        yield driver


def test_page_plays_audio_while_words_light_up(browser, runtime, tmp_path):
    from selenium.webdriver.common.by import By

    expected = runtime.speak(SCRIPT, GenerationParams())
    with live_server(create_app([runtime])) as server:
        browser.get(server.url + "/")
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#voice1 option"), 20)
        script = browser.find_element(By.ID, "script")
        script.clear()
        script.send_keys(SCRIPT)
        browser.find_element(By.ID, "play").click()
        stats = lambda: browser.execute_script("return window.dia2Stats")  # noqa: E731
        wait_until(lambda: stats()["done"] or stats()["error"], 60)
        # Played: every scheduled buffer's `ended` fired, which takes its duration on the audio clock.
        wait_until(lambda: stats()["playedChunks"] == stats()["chunks"] and stats()["spoken"] == stats()["words"], 30)
        browser.save_screenshot(str(tmp_path / "serve-page.png"))
        final = stats()
        words = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#words span")]
        spoken = browser.find_elements(By.CSS_SELECTOR, "#words span.spoken")
        ttfa, rtf = browser.find_element(By.ID, "ttfa").text, browser.find_element(By.ID, "rtf").text
    assert final["error"] is None
    assert final["bytes"] == expected.pcm.size * 2 and final["chunks"] > 1
    assert final["playedSeconds"] == pytest.approx(expected.audio_seconds, abs=0.01)
    assert words == [word for word, _ in expected.timestamps] and len(spoken) == len(words)
    assert ttfa.endswith("ms)") and float(rtf) > 0
    assert (tmp_path / "serve-page.png").stat().st_size > 1000
    print(f"screenshot: {tmp_path / 'serve-page.png'}")
