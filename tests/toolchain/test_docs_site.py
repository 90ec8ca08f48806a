"""The built documentation site, opened in headless Chromium as a reader would open it.

``nox -s docs`` builds the site and then runs this file with ``KLX_DOCS_HTML`` set to the
built folder; elsewhere it skips. It renders the landing page and the API reference in
Debian's ``chromium`` (``apt-get install chromium``; .ci/run installs it) and checks what
the browser shows: every name of ``klx.__all__`` with its signature, reached from the
landing page. It leaves a screenshot of the landing page next to the site (landing.png).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import klx

HTML = os.environ.get("KLX_DOCS_HTML")
pytestmark = pytest.mark.skipif(
    HTML is None, reason="KLX_DOCS_HTML is unset: `nox -s docs` builds the site and runs this"
)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    # Only `nox -s docs` sets KLX_DOCS_HTML, and there the browser test is the point.
    pytest.fail("chromium is not installed: `sudo apt-get install chromium` (.ci/run does this)")


def _browse(page: Path, *args: str) -> str:
    run = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1400,1000",
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture(scope="module")
def site() -> Path:
    root = Path(HTML or "")
    assert (root / "index.html").is_file(), f"no built site in {root}"
    return root


def test_landing_page_renders_and_leads_to_the_api(site):
    dom = _browse(site / "index.html", "--dump-dom")
    assert "<title>klx" in dom
    assert "Nothing in klx has run on a GPU yet" in dom
    assert 'href="api.html"' in dom, "the landing page links to the API reference"
    for page in ("getting-started.html", "kl-div-traps.html", "conformance.html"):
        assert f'href="{page}"' in dom
    shot = site.parent / "landing.png"
    _browse(site / "index.html", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000, "the screenshot of the landing page is blank"


def test_api_reference_shows_every_public_name(site):
    api = _browse(site / "api.html", "--dump-dom")
    assert 'href="generated/klx.html"' in api
    module = _browse(site / "generated" / "klx.html", "--dump-dom")
    text = re.sub(r"<[^>]+>", "", module)
    for name in klx.__all__:
        if name == "__version__":
            continue
        assert f'href="klx.{name}.html' in module, f"{name} is missing from the API reference"
        assert name in text
    page = _browse(site / "generated" / "klx.kl_divergence.html", "--dump-dom")
    text = re.sub(r"<[^>]+>", "", page)
    for words in ("p_form", "temperature", "reduction", "Parameters", "Returns", "Examples"):
        assert words in text, f"kl_divergence's page lacks {words!r}"
