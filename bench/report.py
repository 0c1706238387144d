"""`bench report TASK`: one self-contained HTML file per task, opened from disk.

For each study: its ranked board (with the report's reference numbers and findings where
the variant has them), the paired comparisons against the best configuration, its figures
(embedded as data: URIs, so the file needs no server and no sibling files), its budget
(trials, epochs, device-hours, GPU-hours) and provenance (git sha, versions, devices).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

import pandas as pd

from bench import board, leaderboard
from bench.errors import ConfigError
from bench.registry import Task

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-top:1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.meta{color:#555;font-size:.9em}
figure{display:inline-block;margin:.5em}figure img{max-width:520px;border:1px solid #eee}
figcaption{font-size:.8em;color:#555}.holds{color:#17702b}.fails{color:#b00020}
nav a{margin-right:1em}
"""
# The page records whether every image decoded: headless tests read it from the DOM.
CHECK = """<script>window.addEventListener('load',()=>{const i=[...document.images];
document.body.dataset.images=i.length;document.body.dataset.imagesOk=
i.every(x=>x.complete&&x.naturalWidth>0)?'yes':'no';});</script>"""


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, border=0, na_rep="-")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    name = html.escape(path.stem.replace("_", " "))
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def _findings(sec: board.Section) -> str:
    if not sec.findings:
        return ""
    items = []
    for f in sec.findings:
        cls, word = {True: ("holds", "holds"), False: ("fails", "does not hold"),
                     None: ("", "not measured")}[f["holds"]]
        items.append(f'<li class="{cls}">{html.escape(f["text"])}: <b>{word}</b> at this '
                     f"budget {html.escape(f.get('detail') or '')}</li>")
    src = f"<p class=meta>Reference: {html.escape(sec.source)}</p>" if sec.source else ""
    return f"{src}<ul>{''.join(items)}</ul>"


def _comparison(rows: pd.DataFrame, sec: board.Section, plot_dir: Path) -> str:
    from bench import compare

    done = rows[rows["state"] == "COMPLETE"]
    seeds = done.groupby("config_hash")["seed"].nunique()
    if len(seeds) < 2 or seeds.max() < 2:  # nothing to pair
        return ""
    res = compare.compare(done, sec.metric, sec.direction, sec.params)
    png = compare.cd_diagram(res, plot_dir / "critical_difference.png",
                             f"{sec.study}: {sec.metric}")
    text = "" if res.friedman_p is None else (
        f"<p class=meta>Friedman over {res.friedman_blocks} shared seeds: p = "
        f"{res.friedman_p:.3g}; Nemenyi critical difference "
        f"{res.critical_difference:.2f}</p>")
    return (f"<h3>Is the difference real? (paired by seed, against {html.escape(res.best)})"
            f"</h3>{_table(compare.frame(res))}{text}" + (_img(png) if png else ""))


def _budget(sec: board.Section, rows: pd.DataFrame) -> str:
    b = sec.budget
    versions = sorted(set(rows["bench_version"].dropna()) | set(
        "torch " + v for v in rows["torch_version"].dropna()))
    return (f"<p class=meta>Budget: {b['trials']} trials, {b.get('epochs') or '-'} epochs, "
            f"{b['hours']:.2f} device-hours ({b['gpu_hours']:.2f} on GPUs). Provenance: git "
            f"{html.escape(', '.join(s[:10] for s in b['git_shas']) or '-')}; "
            f"{html.escape(', '.join(versions))}; devices "
            f"{html.escape(', '.join(b['devices']) or '-')}.</p>")


def _section(task: Task, out: Path, sec: board.Section, rows: pd.DataFrame,
             data_dir: Path | None) -> str:
    from bench.plots import make_plots

    anchor = html.escape(sec.study)
    parts = [f'<h2 id="{anchor}">{html.escape(board.header(sec))}</h2>',
             _budget(sec, rows), _table(board.display_table(sec, task)), _findings(sec)]
    figs = make_plots(task.name, out, study=sec.study, data_dir=data_dir)
    plot_dir = figs.paths[0].parent if figs.paths else out / task.name / "plots" / sec.study
    parts.append(_comparison(rows, sec, plot_dir))
    parts += [_img(p) for p in figs.paths]
    parts += [f"<p class=meta>{html.escape(n)}</p>" for n in figs.notes]
    return "\n".join(p for p in parts if p)


def write_report(task: Task, out: Path, study: str | None = None,
                 data_dir: Path | None = None) -> Path:
    rows = leaderboard.read_trials(out, task.name)
    if rows.empty:
        raise ConfigError(f"no trials of {task.name!r} under {out}: nothing to report")
    board.check_selection(rows, task.name, study, None)
    rows = board.filter_rows(rows, study, None)
    secs = board.sections(rows, task)
    body = [f"<h1>bench report: {html.escape(task.name)}</h1>",
            f"<p class=meta>{html.escape(task.doc.rstrip('.'))}. Generated "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from {html.escape(str(out))}"
            ". Configurations are ranked within each study by its own metric; mean ± std "
            "over seeds.</p>",
            "<nav>" + "".join(f'<a href="#{html.escape(s.study)}">{html.escape(s.study)}</a>'
                              for s in secs) + "</nav>"]
    for sec in secs:
        mine = rows[(rows["study"] == sec.study) & (rows["study_uid"].fillna("") ==
                                                    sec.study_uid)]
        body.append(_section(task, out, sec, mine, data_dir))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>bench report: "
            f"{html.escape(task.name)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + CHECK + "</body></html>")
    path = out / task.name / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
