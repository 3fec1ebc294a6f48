"""The web app in a real browser: Debian's chromium, headless, driven by Python playwright (tests/browser.py).

By default on a tiny random model. `WEB_SCREENSHOT_SHIPPED=1` runs it on the shipped default model
and writes the screenshot to output_ImageNet/web.png (how that showcase image is made).
"""
import time

import pytest

from tests.browser import SHIPPED, browser_app, needs_chromium, screenshot_path, set_input

pytestmark = needs_chromium

WATCH_PREVIEW = """() => {
  window.previewSrcs = [];
  const record = () => {
    const img = document.querySelector('#preview img');
    if (img && img.src && window.previewSrcs[window.previewSrcs.length - 1] !== img.src) {
      window.previewSrcs.push(img.src);
      window.galleryAtChange = (window.galleryAtChange || []).concat(
        [document.querySelectorAll('#gallery img').length]);
    }
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                       attributeFilter: ['src']});
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with browser_app(tmp_path_factory.mktemp("browser")) as app:
        yield app.page


def test_generate_streams_previews_then_shows_the_batch(page, tmp_path):
    page.evaluate(WATCH_PREVIEW)
    set_input(page, "prompt", "red apple" if SHIPPED else "sun")
    set_input(page, "n", "3")
    set_input(page, "seed", "7")
    page.locator("#generate").click()
    deadline = time.monotonic() + 120
    while page.locator("#gallery img").count() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.locator("#gallery img").count() == 3
    changes_before_gallery = [n for n in page.evaluate("window.galleryAtChange") if n == 0]
    assert len(changes_before_gallery) >= 2, page.evaluate("window.previewSrcs")
    assert "seed 7" in page.locator("#status").inner_text()
    shot = screenshot_path(tmp_path, "web.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("field, value, message", [
    ("prompt", "   ", "the prompt is empty"),
    ("steps", "0", "steps must be a whole number from 1 to 200"),
    ("n", "17", "number of images must be a whole number from 1 to 16"),
    ("seed", "twelve", "seed must be a whole number"),
])
def test_bad_input_shows_a_clear_message_in_the_page_and_the_app_keeps_working(page, field, value, message):
    seed = str(abs(hash((field, value))) % 100_000)  # unique, so the wait below sees this run's result
    good = {"prompt": "sun", "steps": "5", "n": "1", "seed": seed}
    for name, text in (good | {field: value}).items():
        set_input(page, name, text)
    page.locator("#generate").click()
    page.get_by_text(message).first.wait_for(timeout=30_000)
    assert "Traceback" not in page.content()
    for name, text in good.items():
        set_input(page, name, text)
    page.locator("#generate").click()
    page.get_by_text(f"Done: 1 image(s) of “sun”, seed {seed},").wait_for(timeout=60_000)


def test_the_style_choice_writes_its_words_into_the_prompt_and_generates_them(page):
    """Choosing a style adds its words to the prompt (any other style's words go); "any" takes them off; and the
    model line says what the model was trained on."""
    assert "trained on <strong>Noto, OpenMoji, EmojiOne and clip art pictures (" in page.content()
    set_input(page, "prompt", "sun")
    prompt = page.locator("#prompt textarea, #prompt input").first
    for label, expected in (("OpenMoji", "sun, OpenMoji style"), ("clip art", "sun, clip art"), ("any", "sun")):
        page.locator("#style input").click()
        page.get_by_role("option", name=label, exact=True).click()
        page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want",
                               arg=["#prompt textarea, #prompt input", expected], timeout=30_000)
        assert prompt.input_value() == expected
    page.locator("#style input").click()
    page.get_by_role("option", name="EmojiOne", exact=True).click()
    page.wait_for_function("() => document.querySelector('#prompt textarea, #prompt input').value.endsWith('style')")
    set_input(page, "n", "1")
    set_input(page, "seed", "31")
    page.locator("#generate").click()
    page.get_by_text("Done: 1 image(s) of “sun, EmojiOne style”, seed 31,").wait_for(timeout=60_000)
    # back to "any": the choice stays on the page, and leaving the prompt box re-applies it to what is typed next
    page.locator("#style input").click()
    page.get_by_role("option", name="any", exact=True).click()
    page.wait_for_function("() => document.querySelector('#prompt textarea, #prompt input').value === 'sun'")
