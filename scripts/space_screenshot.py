"""Screenshot of the running Space with an X-ray analysed (the README's picture).

    python space/app.py &                      # or any URL of the app
    python scripts/space_screenshot.py --url http://127.0.0.1:7860 --image space/examples/... --output docs/space.png

Drives Debian's chromium (``/usr/bin/chromium``) with Playwright: upload, Analyse, wait for the
heatmap, full-page screenshot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modeling.cli import add_flag, parse

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def analyse_in_browser(page, url: str, image: str, timeout_ms: int = 120_000) -> None:
    """Open the app, upload ``image``, click Analyse and wait until the heatmap is shown."""
    page.goto(url, wait_until="load")
    page.locator("#analyse").wait_for(state="visible", timeout=timeout_ms)
    page.locator("#upload input[type=file]").set_input_files(image)
    page.locator("#analyse").click()
    page.locator("#heatmap img").wait_for(state="visible", timeout=timeout_ms)
    page.locator("#verdict h3").wait_for(state="visible", timeout=timeout_ms)


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--image", required=True)
    add_flag(ap, "--output", old=("--out",), default="docs/space.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = parse(ap, argv)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        analyse_in_browser(page, args.url, args.image)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.output, full_page=True)
        browser.close()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
