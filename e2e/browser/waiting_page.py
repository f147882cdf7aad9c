"""A real browser in front of a cold service with a waiting page (e2e/tests/activator.rs).

Opens URL in headless Chromium (Debian's chromium-headless-shell, or Playwright's own
where the distribution has none), driven by Playwright,
expects the waiting page, prints "PAGE" (the test then gives the service a pod), and
waits for the page to reload itself onto the app's answer, then prints "APP <text>".
Screenshots of both go to OUT_DIR. Every wait has a deadline; a failure exits non-zero
with the reason on stderr.

    python waiting_page.py URL OUT_DIR [CHROMIUM]
"""

import shutil
import sys
import time

from playwright.sync_api import sync_playwright

url, out = sys.argv[1], sys.argv[2]
# Debian's chromium-headless-shell when installed, else the one Playwright fetched.
chromium = sys.argv[3] if len(sys.argv) > 3 else shutil.which("chromium-headless-shell")

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    try:
        page = browser.new_page()
        t0 = time.monotonic()
        resp = page.goto(url, timeout=30_000)
        waited = time.monotonic() - t0
        title = page.title()
        if resp is None or resp.status != 503 or page.locator("#snooze-waiting").count() != 1:
            sys.exit(f"expected the waiting page, got {resp and resp.status} {title!r}: {page.content()[:300]}")
        page.screenshot(path=f"{out}/waiting-page.png")
        print(f"PAGE {resp.status} {title!r} after {waited:.2f}s", flush=True)
        # The page reloads itself; the load that finds a pod shows the app's answer.
        page.wait_for_function(
            "document.body && document.body.innerText.includes('hello from')", timeout=30_000
        )
        page.screenshot(path=f"{out}/app.png")
        print("APP " + page.inner_text("body").strip().splitlines()[0], flush=True)
    finally:
        browser.close()
