"""The HTML report renders in a real browser: headless Chromium, no console messages, images decoded.

Set-up: Debian's chromium package (`apt-get install -y --no-install-recommends chromium`); the fixture
installs it when it is missing and this user may, and skips, saying why, only when it cannot. The
screenshot is kept as tests/artifacts/report_chromium.png.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import report, write_run

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]
CONSOLE = re.compile(r':CONSOLE[:(]\d+\)?\] "(.*)", source: ')
# After load, report every image that failed to decode and count what rendered (test-only addition).
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  bad.forEach(function (i) { console.error('broken image: ' + i.alt); });
  console.log('effopt-probe: ' + imgs.length + ' images, ' + bad.length + ' broken, ' +
              document.querySelectorAll('table').length + ' tables');
});
</script>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(f"chromium is missing and cannot be installed here; run: {' '.join(APT_INSTALL)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300, check=True)
        subprocess.run(APT_INSTALL, env=env, capture_output=True, timeout=900, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"chromium could not be installed ({' '.join(APT_INSTALL)}): {exc}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get reported success but no chromium binary is on PATH")
    return found


def render(chromium: str, page: Path, screenshot: Path, profile: Path) -> list[str]:
    """Open `page` headless, save a screenshot; return the console messages the page produced."""
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400",
           f"--screenshot={screenshot}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [m.group(1) for m in map(CONSOLE.search, proc.stderr.splitlines()) if m]


def with_probe(html: str) -> str:
    return html.replace("</body>", PROBE + "</body>")


def test_html_report_renders_in_chromium_without_console_errors(tmp_path, chromium):
    import numpy as np
    from PIL import Image

    runs = [write_run(tmp_path, n, p, s) for n, p, s in (("int8", 20.1, 2000), ("int4", 21.0, 1000),
                                                         ("worse", 22.0, 1500))]
    out = tmp_path / "report.html"
    result = report(runs[1], runs[2], "--baseline", runs[0], "--fail-on", "perplexity>+5%", "--format", "html",
                    "--output", out)
    assert result.exit_code == 1  # `worse` regressed: the report is still written
    page = tmp_path / "probed.html"
    page.write_text(with_probe(out.read_text()))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_chromium.png"
    messages = render(chromium, page, shot, tmp_path / "profile")
    assert messages == ["effopt-probe: 3 images, 0 broken, 3 tables"], messages
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    front_blue = int((np.asarray(image) == (31, 119, 180)).all(-1).sum())  # plots.FRONT_COLOR
    assert front_blue > 200, "the plots did not paint"


def test_console_check_catches_a_broken_page(tmp_path, chromium):
    """The same check fails on a page with a broken image and a script error (the test can fail)."""
    page = tmp_path / "broken.html"
    page.write_text(with_probe('<!DOCTYPE html><html><body><img alt="plot" src="data:image/png;base64,AAAA">'
                               "<script>undefinedFunction();</script></body></html>"))
    messages = render(chromium, page, tmp_path / "broken.png", tmp_path / "profile")
    assert "broken image: plot" in messages
    assert any("undefinedFunction is not defined" in m for m in messages)
    assert "effopt-probe: 1 images, 1 broken, 0 tables" in messages
