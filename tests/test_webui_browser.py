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


def test_train_tab_controls_in_a_real_browser(browser, tiny_pipeline_dir, tmp_path):
    """Prodigy sets the learning rate, loraplus shows its ratio, and the form as a browser sends it
    (empty number fields) reaches the handler's own checks."""
    from singlora_diffusion.webui.app import build_app
    from singlora_diffusion.webui.jobs import offered_optimizers

    app = build_app(base=str(tiny_pipeline_dir("sd15")), adapters_dir=tmp_path / "adapters")
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        lr = page.get_by_label("Learning rate (0: the preset's)")
        if "prodigy" in offered_optimizers():
            page.get_by_label("Optimizer").click()
            page.get_by_role("option", name="prodigy").click()
            page.get_by_text("Prodigy estimates its step size itself").wait_for(timeout=30_000)
            assert float(lr.input_value()) == 1.0
        ratio = page.get_by_label("LoRA+ ratio: B's learning rate over A's")
        assert ratio.count() == 0 or not ratio.is_visible()
        page.get_by_label("Adapter to train").click()
        page.get_by_role("option", name="loraplus").click()
        ratio.wait_for(state="visible", timeout=30_000)
        page.get_by_label("...or a folder inside the adapters folder", exact=False).fill("nothere")
        page.get_by_role("button", name="Train", exact=True).click()
        page.get_by_text("'nothere' is not a folder inside the adapters folder").first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "train.png"), full_page=True)
    finally:
        app.close()
