"""What the browser tests share: the app on a real server (tests/webserver.py), opened in Debian's chromium,
headless, driven by Python playwright (`playwright install` cannot download browsers here).

By default the server runs a tiny random model; `WEB_SCREENSHOT_SHIPPED=1` runs the shipped default model, and
the tests then write their screenshots into output_ImageNet/ (how those showcase images are made).
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.webserver import REPO, tiny_model, web_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHIPPED = os.environ.get("WEB_SCREENSHOT_SHIPPED") == "1"

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")


@dataclass
class App:
    page: object  # playwright's Page
    url: str
    out: Path  # the server's --out-dir: one folder of native and display PNGs per generation


@contextmanager
def browser_app(root: Path):
    """The app served from `root` (tiny model, or the shipped one with WEB_SCREENSHOT_SHIPPED=1), open in a page."""
    from playwright.sync_api import sync_playwright
    # trained on the mix, as far as the page knows: the style choice is shown
    checkpoint = None if SHIPPED else tiny_model(root / "tiny.safetensors", dataset="mix", images=8928,
                                                  style_words=("Noto", "OpenMoji", "EmojiOne", "clip art"))
    with web_server(checkpoint, root / "out") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator("#generate").wait_for()
            yield App(page, url, root / "out")
        finally:
            browser.close()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """output_ImageNet/<name> on the shipped model, else a file in tmp_path."""
    return REPO / "output_ImageNet" / name if SHIPPED else tmp_path / name


def set_input(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text], #{elem_id} input[type=number]").first
    box.fill(value)
    box.press("Tab")  # commit the value, as a user leaving the field does
