"""Debian's Chromium, headless, driven by selenium through Debian's chromedriver, for the tests
of the pages kvlm writes (`/cache`, `kvlm visualize`). The browser log is kept so tests can
assert that a page raised no console errors."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[object]:
    """A headless Chromium WebDriver; skips the test when Chromium is not installed
    (`.ci/run` installs it: apt-get install chromium chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    if binary is None or driver_path is None:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: object) -> list[dict]:
    """Browser log entries at SEVERE (uncaught errors, console.error, failed loads)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
