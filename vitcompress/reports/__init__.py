"""Reports for people and CI: Markdown and self-contained HTML with plots, JUnit XML, job summaries."""
from __future__ import annotations

from pathlib import Path

from ..errors import VitcompressError
from ..fileio import read_json, write_text
from .document import Document, document, run_document
from .junit import junit_xml
from .render import to_html, to_markdown

__all__ = ["Document", "check_summary", "document", "junit_xml", "load_document", "to_html", "to_markdown", "write_report_files"]

REPORT_FILES = ("report.md", "report.html")


def check_summary(report: dict) -> str:
    """Markdown of a check report, without figures: what a CI job summary shows."""
    return to_markdown(document(report, title=f"vitcompress check: {Path(report['artifact']).name}"), figures_note=None)


def load_document(folder: Path) -> Document:
    """The document of a folder: a run (manifest.json and its steps' reports) or one command's report.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VitcompressError(f"{folder} is not a folder (expected one holding report.json or manifest.json)")
    if (folder / "manifest.json").exists():
        manifest = read_json(folder / "manifest.json")
        steps = {s["folder"]: read_json(folder / s["folder"] / "report.json")
                 for s in manifest.get("steps") or [] if (folder / s["folder"] / "report.json").exists()}
        return run_document(manifest, steps)
    if (folder / "report.json").exists():
        return document(read_json(folder / "report.json"))
    raise VitcompressError(f"{folder} holds neither report.json nor manifest.json")


def write_report_files(folder: Path, doc: Document) -> dict[str, Path]:
    """report.md and report.html in ``folder``, each written atomically (they are derived files: rewritten freely)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitcompressError(f"cannot create {folder}: {e.strerror or e}") from None
    files = {"markdown": folder / "report.md", "html": folder / "report.html"}
    write_text(files["markdown"], to_markdown(doc))
    write_text(files["html"], to_html(doc))
    return files
