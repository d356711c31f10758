"""The evaluation report rendered in a real browser (Debian's headless Chromium): every image loads and the
page logs no console error. A checker script is injected at the top of a copy of the page; Chromium's
--dump-dom returns the page after load with the checker's verdict in it."""
import json
import os
import shutil
import subprocess

import pytest

from spark_jobs import evaluate, score

CHECKER = """<script>
window.__faceageErrors = [];
window.addEventListener('error', function (e) {
  window.__faceageErrors.push(String(e.message || (e.target && e.target.tagName) || 'error'));
}, true);
var __faceageConsoleError = console.error;
console.error = function () {
  window.__faceageErrors.push(Array.prototype.slice.call(arguments).join(' '));
  __faceageConsoleError.apply(console, arguments);
};
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.alt; });
  var pre = document.createElement('pre');
  pre.id = 'faceage-check';
  pre.textContent = JSON.stringify({images: images.length, broken: broken, errors: window.__faceageErrors,
                                    widths: images.map(function (i) { return i.naturalWidth; })});
  document.body.appendChild(pre);
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs Chromium for the report test (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium here (apt-get install chromium)")
    return found


def test_report_renders_in_a_browser(bundles, tables, tmp_path):
    browser = chromium()
    root, _, _ = tables
    plain, _ = bundles
    scored, report = tmp_path / "scored", tmp_path / "report"
    assert score.main(["--model", str(plain), "--input", str(root / "pq"), "--split", "test",
                       "--output", str(scored)]) == 0
    assert evaluate.main(["--predictions", str(scored), "--labels", str(root / "pq"), "--split", "test",
                          "--output", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    page = (report / "report.html").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + CHECKER, 1))
    profile = tmp_path / "profile"
    proc = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", checked.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'id="faceage-check"' in dom, dom[-2000:]
    verdict = json.loads(dom.split('id="faceage-check">', 1)[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    assert verdict["images"] == len(metrics["plots"]) >= 4
    assert verdict["broken"] == [] and verdict["errors"] == []
    assert all(w > 300 for w in verdict["widths"])
    shot = tmp_path / "report.png"  # a picture of the page, for a person to look at (kept with the test's files)
    subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--window-size=1100,4000",
                    f"--screenshot={shot}", (report / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
