"""The pieces of the self-contained HTML pages the report stages write (a run's page, the
sweep page): one style, tables whose numbers sort, answers marked right or wrong, and
images embedded as data URLs, so a page is one file that opens anywhere."""
import base64
import html
import json

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.95em; }
td.right { background: #eaf7ee; }
td.wrong { background: #fbeaea; }
img { max-width: 100%; }
"""


class Mark:
    """An answer shown as right or wrong (verdict 'right', 'wrong', or '' when it has no reference)."""

    def __init__(self, text, verdict):
        self.verdict = verdict
        self.text = {"right": "✓ ", "wrong": "✗ ", "": ""}[verdict] + text


def cell(value, css="", preformatted=True):
    """One table cell: numbers right-aligned with their exact value for sorting, text preformatted
    (or, in a sortable table, plain, to keep its columns narrow)."""
    css = f" {css}" if css else ""
    if isinstance(value, bool):
        return f"<td class='{css.strip()}'>{'true' if value else 'false'}</td>"
    if isinstance(value, (int, float)):
        shown = f"{value:.4g}" if isinstance(value, float) else f"{value:,}"
        return f'<td class="num{css}" data-value="{value}">{shown}</td>'
    if isinstance(value, Mark):
        return f"<td class='{value.verdict}'><pre>{html.escape(value.text)}</pre></td>"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    text = html.escape("" if value is None else str(value))
    return f"<td class='{css.strip()}'><pre>{text}</pre></td>" if preformatted else f"<td class='{css.strip()}'>{text}</td>"


def table(headers, rows, row_classes=None, table_id=None, titles=None, cell_classes=None):
    """A table; with `table_id` a sortable one (header and body apart, for the sorting script).
    titles: a tooltip per header; cell_classes: a CSS class per column."""
    row_classes = row_classes or [""] * len(rows)
    titles = titles or [""] * len(headers)
    cell_classes = cell_classes or [""] * len(headers)
    head = "".join(f"<th title='{html.escape(str(title))}'>{html.escape(str(header))}</th>" if title
                   else f"<th>{html.escape(str(header))}</th>" for header, title in zip(headers, titles))
    body = "".join(f"<tr class='{css}'>" + "".join(cell(v, c, table_id is None) for v, c in zip(row, cell_classes))
                   + "</tr>" for row, css in zip(rows, row_classes))
    if table_id is None:
        return f"<table><tr>{head}</tr>{body}</table>"
    return (f"<div class='scroll'><table class='sortable' id='{table_id}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, column) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const ascending = th.dataset.order !== 'asc';
  th.dataset.order = ascending ? 'asc' : 'desc';
  const key = row => { const text = row.cells[column].dataset.value ?? row.cells[column].textContent;
                       const number = parseFloat(text); return isNaN(number) ? text : number; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : -1) * (ascending ? 1 : -1)).forEach(r => body.appendChild(r));
}));
"""


def image(alt, png):
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def page(title, parts, style=""):
    """A whole page: the shared style (and `style`), the parts, and the sorting script."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                      f"<style>{STYLE}{style}</style></head><body>", *parts,
                      f"<script>{SORT_SCRIPT}</script></body></html>"])
