"""The report's faces: terminal, one self-contained HTML file (opened in headless
Chromium and screenshotted), PNG charts."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from fleet.report import build_report, render_html, render_terminal, write_html, write_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _distinct_colours(png: Path) -> tuple[int, int]:
    """(distinct colours, pixels that are neither white nor grey) of an image."""
    from matplotlib.image import imread

    pixels = imread(str(png))[..., :3].reshape(-1, 3)
    rounded = {tuple(round(c * 255) for c in pixel) for pixel in pixels[::7]}
    coloured = sum(
        1
        for r, g, b in (tuple(int(c * 255) for c in p) for p in pixels[::7])
        if max(r, g, b) - min(r, g, b) > 40
    )
    return len(rounded), coloured


def test_terminal_summary(recorded):
    job, events, prices = recorded("mixed")
    report = build_report(job, events, prices)
    buffer = io.StringIO()
    render_terminal(report, Console(file=buffer, width=200, force_terminal=False, color_system=None))
    text = buffer.getvalue()
    for name in ("mix-w1-g1", "mix-w2-g1", "mix-w5-g1", "fleet"):
        assert name in text
    for word in (
        "network-bound",
        "disk-bound",
        "cpu-bound",
        "gpu-bound",
        "idle",
        "where the time went",
        "lost to preemption",
        "per 1,000 items",
        "missing:",
        "samples stop at",
        "->",
    ):
        assert word in text, word
    row = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("mix-w3-g1"))
    assert "97/100" in row  # disk busy mean/p95


def test_html_is_one_self_contained_file(recorded, tmp_path):
    job, events, prices = recorded("mixed")
    path = write_html(build_report(job, events, prices), tmp_path / "out" / "report.html")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("<svg") == 7 + 1  # one timeline per node + the time bar
    assert "preempted" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched from anywhere
    assert "<script" not in text and "@import" not in text and "url(" not in text
    assert not list(path.parent.glob(".*.tmp"))


def test_html_escapes_what_it_shows(tmp_path):
    job = tmp_path / "jobs" / "j"
    (job / "metrics").mkdir(parents=True)
    events = [{"t": 1.0, "node": "<img src=x onerror=alert(1)>", "kind": "requested", "detail": "<b>"}]
    text = render_html(build_report(job, events))
    assert "<img src=x" not in text and "&lt;img src=x" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_html_report_shows_its_charts_in_headless_chromium(recorded, tmp_path):
    job, events, prices = recorded("mixed")
    html = write_html(build_report(job, events, prices), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            html.as_uri(),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), result.stderr[-2000:]
    colours, coloured_pixels = _distinct_colours(shot)
    # a blank page has one colour; text alone is greys; the charts bring many saturated colours
    assert colours > 50, colours
    assert coloured_pixels > 5000, coloured_pixels

    # and the same page without its charts is far less colourful: the charts are what shows
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<svg.*?</svg>", "", html.read_text(), flags=re.DOTALL))
    bare_shot = tmp_path / "bare.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={bare_shot}",
            "--window-size=1200,1600",
            bare.as_uri(),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _, bare_coloured = _distinct_colours(bare_shot)
    assert coloured_pixels > 2 * bare_coloured, (coloured_pixels, bare_coloured)


def test_png_charts(recorded, tmp_path):
    job, events, prices = recorded("multi_gpu")
    written = write_png(build_report(job, events, prices), tmp_path / "png")
    assert sorted(p.name for p in written) == ["fleet.png", "mg-w1-g1.png", "mg-w2-g1.png"]
    for path in written:
        colours, coloured = _distinct_colours(path)
        assert colours > 20 and coloured > 1000, (path.name, colours, coloured)
