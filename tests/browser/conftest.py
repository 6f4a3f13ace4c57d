"""Browser tests: the real services of tests/conftest.py, and Debian's headless Chromium.

Chromium is the system package (`apt-get install chromium`), driven by Python Playwright without
`playwright install`, so nothing is downloaded at test time. $CHROMIUM points elsewhere if needed.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the Chromium binary; a missing one fails with how to install it (CI installs it)."""
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no Chromium at {path}: `apt-get install chromium` (Debian), or set $CHROMIUM")
    return path
