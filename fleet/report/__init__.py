"""The overhead report: where a job's time went, per node, and what to change.

    report = build_report(job_dir, events, prices)   # a local copy of jobs/<job>/
    report.to_json()                                  # the `fleet report --json` object
    render_terminal(report, console)                  # rich table + verdicts
    write_html(report, path)                          # one self-contained HTML file
    write_png(report, directory)                      # matplotlib charts (lazy import)

Modules: `load` (reading metrics defensively), `stats`, `verdict` (the rules of
docs/report.md), `timeline` (time and cost accounting from events), `analyze`
(`build_report`), `model` (the Report data), `terminal`, `svg` + `html`, `png`.
Never imports torch; matplotlib only inside `write_png`.
"""

from fleet.report.analyze import build_report
from fleet.report.html import render_html, write_html
from fleet.report.model import FleetSummary, NodeReport, Report
from fleet.report.png import write_png
from fleet.report.terminal import render_terminal
from fleet.report.verdict import VERDICTS, Thresholds, Verdict

__all__ = [
    "VERDICTS",
    "FleetSummary",
    "NodeReport",
    "Report",
    "Thresholds",
    "Verdict",
    "build_report",
    "render_html",
    "render_terminal",
    "write_html",
    "write_png",
]
