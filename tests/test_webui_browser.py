"""A real browser (Debian chromium driven by playwright) types a prompt, clicks Generate, sees an image."""
import io

import pytest
from PIL import Image, ImageStat

from singlora_diffusion.webui.browser import find_chromium, generate_in_page, launch

CHROMIUM = find_chromium()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's chromium when run as root; "
                    "install it with your package manager to run this test")
    with playwright.sync_playwright() as p:
        b = launch(p, CHROMIUM)
        yield b
        b.close()


def test_generate_in_a_real_browser(browser, tiny_pipeline_dir, tmp_path):
    from singlora_diffusion.webui.app import build_app

    app = build_app(base=str(tiny_pipeline_dir("sd15")), adapters_dir=tmp_path / "adapters")
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url)
        image = generate_in_page(page, "a photo of sks dog on the beach")  # waits for the served PNG
        shot = image.screenshot()
        page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
        assert (tmp_path / "generate.png").stat().st_size > 0
        stats = ImageStat.Stat(Image.open(io.BytesIO(shot)).convert("L"))
        assert stats.stddev[0] > 5, "the generated image is blank"
    finally:
        app.close()
