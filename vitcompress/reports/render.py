"""Documents as Markdown (readable as plain text; what a CI job summary shows) and as one
self-contained HTML file (figures embedded as base64 PNGs: it opens anywhere, offline)."""
from __future__ import annotations

import base64
import html

from .document import Document, Figure, Table


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    header = t.header if any(t.header) else ["", ""]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]


def to_markdown(doc: Document, figures_note: str | None = "report.html") -> str:
    """``figures_note``: where the figures are (a line per figure says so); None leaves figures out."""
    lines = [f"# {doc.title}", ""]
    for section in doc.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += _md_table(block)
            elif isinstance(block, Figure):
                if figures_note is None:
                    continue
                lines.append(f"_Figure ({figures_note}): {block.caption}._")
            else:
                lines.append(block)
            lines.append("")
    if doc.timing_fields:
        lines += ["## Timings", "", "These fields are timings: they change from run to run on the same inputs.", ""]
        lines += [f"- `{f}`" for f in doc.timing_fields] + [""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
.fail { color: #b00; font-weight: bold; } .pass { color: #070; font-weight: bold; }
"""


def _html_text(text: str) -> str:
    escaped = html.escape(text)
    for word, cls in (("**PASS**", "pass"), ("**FAIL**", "fail")):
        escaped = escaped.replace(word, f'<span class="{cls}">{word.strip("*")}</span>')
    return escaped


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.header) if any(t.header) else ""
    rows = "".join("<tr>" + "".join(f"<td>{_html_text(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{rows}</table>"


def _html_figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    alt = html.escape(f.caption)
    return f'<figure id="fig-{html.escape(f.name)}"><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def to_html(doc: Document) -> str:
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(doc.title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(doc.title)}</h1>"]
    for section in doc.sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, Figure):
                parts.append(_html_figure(block))
            else:
                parts.append(f"<p>{_html_text(block)}</p>")
        parts.append("</section>")
    if doc.timing_fields:
        items = "".join(f"<li><code>{html.escape(f)}</code></li>" for f in doc.timing_fields)
        parts.append(f"<section><h2>Timings</h2><p>These fields are timings: they change from run to run on the same inputs.</p><ul>{items}</ul></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
