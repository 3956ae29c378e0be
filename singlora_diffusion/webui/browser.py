"""A real browser on the app, as the README's screenshots (webui/screenshots.py) and the browser
test drive it: Debian's chromium through playwright, kept off the network.
"""
from __future__ import annotations

import shutil

# playwright adds --headless and a fresh temporary profile itself; these keep chromium from
# calling home (updates, sync, QUIC) and resolve every host but the app's to nothing.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright, executable: str | None = None):
    """A headless chromium (playwright's sync API) with CHROMIUM_FLAGS."""
    return playwright.chromium.launch(executable_path=executable or find_chromium(), args=CHROMIUM_FLAGS)


def generate_in_page(page, prompt: str, timeout_ms: int = 120_000):
    """Type `prompt` on the Generate tab, click Generate, wait for the image; returns its locator."""
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate", exact=True).click()
    image = page.locator("#gallery img[src*='gradio_api/file=']").first  # the served PNG, not an icon
    image.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_timeout(500)  # the gallery finishes laying out
    return image
