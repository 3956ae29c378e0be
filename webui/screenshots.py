#!/usr/bin/env python
"""Regenerate the README's screenshots (docs/webui-*.png) with Debian's chromium.

    .venv/bin/python webui/screenshots.py [--adapters_dir outputs] [--base toy:shapes]

Opens the app on its default base (the toy base, toy:shapes, offline), renders one image
of the Generate tab's starting prompt, and captures each tab.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def main() -> int:
    from playwright.sync_api import sync_playwright

    from singlora_diffusion.pipelines import TOY_BASE
    from singlora_diffusion.webui.app import build_app
    from singlora_diffusion.webui.browser import generate_in_page, launch
    from singlora_diffusion.webui.defaults import profile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--adapters_dir", default="outputs")
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--base", default=TOY_BASE)
    args = p.parse_args()
    app = build_app(base=args.base, adapters_dir=args.adapters_dir)
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url)
            adapters = [o for o in app.engine.out_dir.parent.parent.rglob("singlora_weights.safetensors")]
            generate_in_page(page, profile(args.base).prompt)
            page.screenshot(path=f"{args.out}/webui-generate.png", full_page=True)
            for tab in ("Train", "Evaluate"):
                button = page.get_by_role("tab", name=tab)
                if button.count():
                    button.click()
                    page.wait_for_timeout(500)
                    page.screenshot(path=f"{args.out}/webui-{tab.lower()}.png", full_page=True)
            browser.close()
            print(f"screenshots written to {args.out} ({len(adapters)} adapters listed)")
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
