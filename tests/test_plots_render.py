"""`dvc plots show`'s HTML, rendered by a real headless Chromium: the drawn marks carry validation
points only at the evaluated steps, no zeros, the four charts and their axis titles.

The page loads vega from a CDN (unreachable here), so the test swaps the three CDN script tags for
one local bundle of the same libraries (`vl_convert.javascript_bundle()`, from the
vl-convert-python wheel) and reads back what vega drew (the scenegraph) from the DOM. Skipped
where Chromium or vl-convert-python is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.dvcrepo import sh

pytestmark = pytest.mark.slow

EVAL_STEPS, LOG_STEPS = [6, 12], [3, 6, 9, 12]  # tests/dvcrepo.TINY_PIPELINE

# After each chart renders, walk what vega drew and write it into the page as JSON.
PROBE = """
<script>
window.__drawn = {};
const __embed = window.vegaEmbed;
window.vegaEmbed = (el, spec) => __embed(el, spec, {renderer: "svg", actions: false}).then(r => {
  const marks = [], titles = [];
  const walk = (node) => {
    if (!node) return;
    if (node.marktype === "text" && node.role === "axis-title") {
      (node.items || []).forEach(t => titles.push(t.text));
    } else if (["line", "symbol"].includes(node.marktype)) {
      (node.items || []).forEach(i => i.datum && i.datum.step !== undefined && marks.push({
        mark: node.marktype, step: Number(i.datum.step),
        y: Number(i.datum.dvc_inferred_y_value), series: i.datum["filename::field"]}));
    }
    (node.items || []).forEach(walk);
  };
  walk(r.view.scenegraph().root);
  window.__drawn[el] = {marks, titles};
  document.getElementById("probe").textContent = JSON.stringify(window.__drawn);
  return r;
});
</script>
"""


def local_page(html: str, bundle: Path) -> str:
    """The same page with the CDN scripts replaced by the local bundle and the probe."""
    cdn = re.findall(r'<script src="https://cdn\.jsdelivr\.net/npm/[^"]+"></script>', html)
    assert [re.sub(r"@[\d.]+", "", c.split("/npm/")[1]) for c in cdn] == [
        'vega"></script>',
        'vega-lite"></script>',
        'vega-embed"></script>',
    ]
    for c in cdn[1:]:
        html = html.replace(c, "")
    return html.replace(
        cdn[0], f'<script src="{bundle.name}"></script>{PROBE}<pre id="probe"></pre>'
    )


def test_dvc_plots_render_the_truth_in_chromium(repo_copy: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    vl_convert = pytest.importorskip("vl_convert")

    out = tmp_path / "dvc_plots"
    sh(["dvc", "plots", "show", "-o", str(out)], repo_copy)
    bundle = out / "vega-bundle.js"
    bundle.write_text(vl_convert.javascript_bundle(), encoding="utf-8")
    page = out / "local.html"
    page.write_text(local_page((out / "index.html").read_text(encoding="utf-8"), bundle))
    proc = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            "--virtual-time-budget=20000", "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1), proc.stderr[-3000:]
    drawn = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert set(drawn) == {"#loss", "#lr", "#grad_norm", "#throughput"}  # no automatic mfu chart

    loss = drawn["#loss"]
    assert set(loss["titles"]) == {"optimizer step", "cross-entropy loss (nats/token)"}
    val = sorted({p["step"] for p in loss["marks"] if p["series"] == "val.csv::val_loss"})
    train = sorted({p["step"] for p in loss["marks"] if p["series"] == "train.csv::train_loss"})
    assert val == EVAL_STEPS and train == LOG_STEPS
    assert all(p["y"] > 0 for p in loss["marks"])  # no empty cell drawn as 0
    for chart, ylabel in (
        ("#lr", "learning rate"),
        ("#grad_norm", "global L2 norm"),
        ("#throughput", "tokens/s"),
    ):
        assert set(drawn[chart]["titles"]) == {"optimizer step", ylabel}
        assert sorted({p["step"] for p in drawn[chart]["marks"]}) == LOG_STEPS
