"""A real browser (Debian chromium driven by playwright) types a prompt, clicks Generate, sees an image."""
import io
import shutil

import pytest
from PIL import Image, ImageStat

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# playwright adds --headless and a fresh temporary profile itself
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's chromium when run as root; "
                    "install it with your package manager to run this test")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def test_generate_in_a_real_browser(browser, tiny_pipeline_dir, tmp_path):
    from singlora_diffusion.webui.app import build_app

    app = build_app(base=str(tiny_pipeline_dir("sd15")), adapters_dir=tmp_path / "adapters")
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url)
        prompt = page.get_by_label("Prompt", exact=True)
        prompt.fill("a photo of sks dog on the beach")
        page.get_by_role("button", name="Generate", exact=True).click()
        image = page.locator("#gallery img[src*='gradio_api/file=']").first  # the served PNG, not an icon
        image.wait_for(state="visible", timeout=120_000)
        page.wait_for_timeout(500)
        shot = image.screenshot()
        page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
        assert (tmp_path / "generate.png").stat().st_size > 0
        stats = ImageStat.Stat(Image.open(io.BytesIO(shot)).convert("L"))
        assert stats.stddev[0] > 5, "the generated image is blank"
    finally:
        app.close()
