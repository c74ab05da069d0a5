"""One self-contained HTML page: tables, plots and sample grids inlined (data URIs, inline CSS).

No scripts, fonts or links to other files, so the page reads the same offline and when mailed.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from ptqbench.report.plots import Plot
from ptqbench.report.tables import Cell, Table

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2rem auto;
max-width:1400px;padding:0 1rem;color:#1d1d1f;background:#fff;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.4rem;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9rem}.meta code{font-size:.85rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.85rem;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .6rem;border-bottom:1px solid #e3e3e3;white-space:nowrap}
thead th{border-bottom:2px solid #333;background:#f6f6f6;vertical-align:bottom}
th .sub{display:block;font-weight:normal;color:#666;font-size:.75rem}
td.r,th.r{text-align:right}td.l,th.l{text-align:left}
tr.ref td{background:#eef4ff}tr.failed td{background:#fff0f0;color:#8a1c1c}tr.running td{background:#fff8e6}
.legend,.footnotes{font-size:.8rem;color:#444}.footnotes li{margin:.15rem 0}
figure{margin:1.2rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.8rem;color:#555}
details{margin:.5rem 0;font-size:.8rem}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto}
nav ul{columns:2;font-size:.9rem}.notes li{font-size:.85rem;color:#6a4b00}
.ci{color:#666;font-size:.9em}.rep{color:#7a5c00;font-size:.85em}
"""


@dataclass(frozen=True)
class Section:
    """One group on the page: its table (with LaTeX and CSV) and plots."""

    table: Table
    latex: str
    csv: str
    plots: Sequence[Plot]


_INTERVAL = re.compile(r"^(\S+)( (?:± \S+|\[[^\]]*\]))(.*)$")


def _metric_text(text: str) -> str:
    """A metric cell's text with its interval (``± h`` or ``[lo, hi]``) in a lighter span."""
    found = _INTERVAL.match(text)
    if not found:
        return escape(text)
    value, interval, rest = found.groups()
    return f'{escape(value)}<span class="ci">{escape(interval)}</span>{escape(rest)}'


def _cell(cell: Cell, align: str, slug: str, metric: bool = False) -> str:
    text = _metric_text(cell.text) if metric else escape(cell.text)
    if cell.spread:
        text += f' <span class="rep">{escape(cell.spread)}</span>'
    if cell.bold:
        text = f"<strong>{text}</strong>"
    text += "".join(f'<sup><a href="#fn-{escape(slug)}-{n}">{n}</a></sup>' for n in cell.notes)
    return f'<td class="{align}">{text}</td>'


def table_html(table: Table) -> str:
    head = "".join(
        f'<th class="{c.align}">{escape(c.header)}'
        + (f'<span class="sub">{escape(c.subheader)}</span>' if c.subheader else "")
        + "</th>"
        for c in table.columns
    )
    body = []
    for i, row in enumerate(table.rows):
        status = row[table.status_column].text
        cls = "ref" if i < table.reference_rows and status == "finished" else ("" if status == "finished" else status)
        cells = "".join(_cell(c, col.align, table.slug, col.metric) for c, col in zip(row, table.columns, strict=True))
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    notes = "".join(f'<li id="fn-{escape(table.slug)}-{i}">{escape(t)}</li>' for i, t in enumerate(table.footnotes, 1))
    return (
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f'<p class="legend">{escape(table.legend)}.</p>'
        + (f'<ol class="footnotes">{notes}</ol>' if notes else "")
    )


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def section_html(section: Section) -> str:
    t = section.table
    parts = [f'<section id="{escape(t.slug)}"><h2>{escape(t.title)}</h2>', table_html(t)]
    csv_uri = _data_uri("text/csv", section.csv.encode())
    parts.append(f'<p class="legend"><a download="{escape(t.slug)}.csv" href="{csv_uri}">download CSV</a></p>')
    parts.append(f"<details><summary>LaTeX</summary><pre>{escape(section.latex)}</pre></details>")
    for plot in section.plots:
        uri = _data_uri("image/png", plot.png.read_bytes())
        parts.append(
            f'<figure><img src="{uri}" alt="{escape(plot.title)}: {escape(t.title)}">'
            f"<figcaption><b>{escape(plot.title)}.</b> {escape(plot.caption)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def page(sections: Sequence[Section], meta: Sequence[tuple[str, str]], notes: Sequence[str]) -> str:
    """The whole page; ``meta`` are (label, value) lines shown under the title."""
    meta_html = "".join(f"<div>{escape(k)}: <code>{escape(v)}</code></div>" for k, v in meta)
    toc = "".join(f'<li><a href="#{escape(s.table.slug)}">{escape(s.table.title)}</a></li>' for s in sections)
    notes_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>ptqbench report</title>",
            f"<style>{CSS}</style></head><body>",
            "<h1>ptqbench report</h1>",
            f'<div class="meta">{meta_html}</div>',
            f"<nav><ul>{toc}</ul></nav>" if len(sections) > 1 else "",
            *(section_html(s) for s in sections),
            f'<section id="notes"><h2>Notes</h2><ul class="notes">{notes_html}</ul></section>' if notes else "",
            "</body></html>",
            "",
        ]
    )
