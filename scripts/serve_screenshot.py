"""Screenshot of a running `itmatch serve` page: type a query, click an image, show a word's attention.

    python scripts/serve_screenshot.py http://127.0.0.1:8000 "a query" docs/serve.png [--click ID] [--word WORD]

Drives Debian's Chromium (/usr/bin/chromium, `apt-get install chromium`) through Playwright.
"""

from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("query")
    p.add_argument("out")
    p.add_argument("--click", help="image id to open (default: the first ground-truth hit, else the first hit)")
    p.add_argument("--word", help="query word whose attention to show (default: the page's choice)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(args.url.rstrip("/") + "/")
        page.wait_for_function("document.getElementById('info').textContent.includes('images:')")
        page.fill("#query", args.query)
        page.click("#search")
        page.wait_for_selector(".hit img")
        page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth)")
        target = f".hit[data-id='{args.click}']" if args.click else ".hit.gt, .hit"
        page.locator(target).first.click()
        page.wait_for_selector("#retrieved-caps li, #gt-caps li")
        if args.word:
            page.wait_for_selector("#words button")
            page.locator("#words button", has_text=args.word).first.click()
        page.wait_for_timeout(300)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
