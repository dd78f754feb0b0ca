"""The paper's Table III and Figures 4-8 from a grid's run folders, and one self-contained report.html.

* ``table3.{md,csv,tex}``: Fine-pruning (CA / ASR / ASR-C per prune ratio) and NAD (per epoch) for
  every run that has those defense.json files; the headline is ASR-C for untargeted attacks and
  ASR for the targeted controls (:func:`cuba.defenses.base.headline_asr_key`), and says so;
  ``defenses.md``: every defense's headline numbers (STRIP / SentiNet / SCALE-UP AUROC, Neural
  Cleanse's anomaly index, ...) per defended run.
* figures (``figures/``): Fig. 4 triggers, Fig. 5 confidences and the per-source-class histograms of
  a CUBA run (copied from its run folder; ``cuba figures RUN`` draws them for an older run), Fig. 6 STRIP entropies, Fig. 7 Neural Cleanse norms and SentiNet scatter (from the
  defense folders), Fig. 8 the source-class-1 histograms of CUBA FRA beside the untargeted
  baselines (drawn by :func:`cuba.compare.compare`).
* ``report.html``: table2 (with the paper's numbers and the differences), table3, every figure
  embedded as base64 PNG, and each run's config in a collapsible block -- one file, viewable
  offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import shutil
from pathlib import Path
from typing import Sequence

import yaml

from ..defenses.base import at_chance, headline_asr_key_of
from ..runs import read_json, write_text
from .tables import (PAPER_MODELS, PROTOCOL_NOTE, blocked_notes, finished_runs, paper_dataset, table2_markdown,
                     table2_rows)
from ..formatting import pct

REMOVAL = (("fine-pruning", "prune_ratio"), ("nad", "epoch"))

# read beside Table II: what the DS scale columns and the degenerate flag mean
TABLE2_NOTE = ("DS floor: the DS of total collapse onto one class; DS uniform: the expected DS of an attacker "
               "drawing uniformly from T(y) with this run's successful images per class; eff. classes: "
               "e^entropy of the successful predictions per source class. A DS is read between the first two. "
               "A setting marked degenerate (CA at chance, or more than 10 points under the clean CA) has "
               "stopped classifying: its ASR/DS read n/a, not a backdoor. – : not recorded by an older run.")


def _is_paper_nad_model(config: dict) -> bool:
    """Whether a run is the model of the paper's NAD rows: CIFAR-10 (or its copy) with ResNet18."""
    data, model = config.get("data", config), config.get("model", config)
    paper = paper_dataset(Path(str(data.get("dataset", ""))).stem)
    return paper == "cifar10" and model.get("model") == PAPER_MODELS[paper]


def table3_rows(out: Path) -> list[dict]:
    """One dict per removal step of every run's Fine-pruning / NAD defense.json. ``asr_c`` is there
    only when the defense.json recorded it; ``headline`` is the run's headline ASR key."""
    rows = []
    for run in finished_runs(out):
        for name, key in REMOVAL:
            f = run.path / "defenses" / name / "defense.json"
            if f.is_file():
                js = read_json(f)
                headline = headline_asr_key_of({"setting": run.label, **js})
                for r in js.get("rows", []):
                    rows.append({"run": run.path.name, "setting": run.label, "defense": name, "step": r[key],
                                 "ca": r["ca"], "asr": r["asr"], **({"asr_c": r["asr_c"]} if "asr_c" in r else {}),
                                 "headline": headline, "num_classes": run.metrics.get("num_classes"),
                                 "paper_model": _is_paper_nad_model(getattr(run, "config", {}))})
    return rows


def _headline(r: dict) -> str:
    """A table3 row's headline ASR key (rows built by hand or by older code may lack ``headline``)."""
    return headline_asr_key_of({"asr_headline_key": r.get("headline"), "setting": r.get("setting", "clean")})


# The paper's Table III (CIFAR-10 / ResNet18, CUBA): NAD's ASR and CA after 2..10 epochs. Its
# Fine-pruning row is printed without legible prune ratios in our copy, so it is not set here.
PAPER_NAD = {2: (81.39, 93.61), 4: (80.91, 92.07), 6: (79.22, 89.85), 8: (76.40, 87.99), 10: (66.89, 77.34)}


AT_CHANCE_NOTE = ("‡ clean accuracy under twice chance (2/K): the repaired model has (nearly) stopped "
                  "classifying, so its ASR counts how often its few predicted classes fall in the target "
                  "set (a constant predictor scores (K-1)/K under FRA), and its ASR-C rests on the few images "
                  "it still gets right: neither is a surviving backdoor.")
HEADLINE_NOTE = ("Headline: ASR-C for untargeted attacks (the row marked \"(headline)\": ASR over the backdoor "
                 "test images whose clean twin the same repaired model classifies correctly; plain ASR is at "
                 "least 1 - CA there once repair costs accuracy, backdoor or not), plain ASR for the targeted controls.")
FALLBACK_NOTE = ("† ASR-C not recorded (defense.json written before it): the headline falls back to plain ASR, "
                 "which for an untargeted attack also counts the repaired model's clean mistakes.")


def table3_markdown(rows: list[dict]) -> str:
    """One table per defense in the paper's layout: a CA row and an ASR row per run, one column
    per prune ratio (Fine-pruning) or epoch (NAD), plus an ASR-C row -- the headline -- for
    untargeted runs; NAD also gets the paper's rows. ASR values of models left at chance-level CA
    are marked ‡ (see :data:`AT_CHANCE_NOTE`); an untargeted run whose defense.json predates ASR-C
    gets its ASR row marked † as the fallback headline (:data:`FALLBACK_NOTE`)."""
    blocks = []
    marked = fallback = untargeted = False
    for name, key in REMOVAL:
        mine = [r for r in rows if r["defense"] == name]
        if not mine:
            continue
        paper = name == "nad" and any(r.get("paper_model") for r in mine)
        steps = sorted({r["step"] for r in mine} | (set(PAPER_NAD) if paper else set()))
        head = f"| {name} | | " + " | ".join(f"{s:g}" for s in steps) + " |"
        lines = [head.replace("| | ", f"| {key.replace('_', ' ')} → | ", 1), "|---|---|" + "---|" * len(steps)]
        for run in dict.fromkeys(r["run"] for r in mine):
            by_step = {r["step"]: r for r in mine if r["run"] == run}
            wants_c = _headline(next(iter(by_step.values()))) == "asr_c"
            has_c = any("asr_c" in r for r in by_step.values())
            untargeted |= wants_c
            metrics = [("ca", "CA"), ("asr", "ASR")]
            if wants_c and has_c:
                metrics.append(("asr_c", "ASR-C (headline)"))
            elif wants_c:
                metrics[1] = ("asr", "ASR † (headline)")
                fallback = True
            for metric, label in metrics:
                vals = []
                for s in steps:
                    r = by_step.get(s)
                    flag = (r is not None and metric in ("asr", "asr_c") and r.get(metric) is not None
                            and at_chance(r["ca"], r.get("num_classes")))
                    marked |= flag
                    vals.append("" if r is None else pct(r.get(metric)) + (" ‡" if flag else ""))
                lines.append(f"| {run} | {label} | " + " | ".join(vals) + " |")
        if paper:  # beside the paper's model only, as in Table II
            for i, metric in ((1, "CA"), (0, "ASR")):
                vals = [f"{PAPER_NAD[s][i]:.2f}" if s in PAPER_NAD else "" for s in steps]
                lines.append(f"| paper (CIFAR-10 / ResNet18) | {metric} | " + " | ".join(vals) + " |")
        blocks.append("\n".join(lines))
    if not blocks:
        return "(no Fine-pruning or NAD results yet)"
    notes = [n for n, on in ((HEADLINE_NOTE, untargeted), (FALLBACK_NOTE, fallback), (AT_CHANCE_NOTE, marked)) if on]
    return "\n\n".join(blocks + notes)


def write_table3(out: Path) -> list[Path]:
    rows = table3_rows(out)
    md = [table3_markdown(rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "setting", "defense", "step", "ca", "asr", "asr_c", "headline_asr"])
    blank = lambda v: "" if v is None else v  # noqa: E731
    for r in rows:
        head = _headline(r)
        head = head if head == "asr" or "asr_c" in r else "asr (asr_c not recorded)"
        w.writerow([r["run"], r["setting"], r["defense"], r["step"], r["ca"], blank(r["asr"]), blank(r.get("asr_c")), head])
    tex = ["% headline ASR in bold: ASR-C for untargeted attacks, ASR for the targeted controls",
           "\\begin{tabular}{lllrrr}", "\\toprule",
           "Run & Defense & Ratio / epoch & CA (\\%) & ASR (\\%) & ASR-C (\\%) \\\\", "\\midrule"]
    for r in rows:
        bold = "asr_c" if _headline(r) == "asr_c" and "asr_c" in r else ("asr" if r["asr"] is not None else None)
        cell = lambda k: f"\\textbf{{{pct(r.get(k))}}}" if k == bold else pct(r.get(k))  # noqa: E731
        tex.append(f"{r['run']} & {r['defense']} & {r['step']:g} & {pct(r['ca'])} & {cell('asr')} & {cell('asr_c')} \\\\"
                   .replace("–", "--").replace("_", "\\_"))
    tex += ["\\bottomrule", "\\end{tabular}"]
    files = []
    for suffix, text in (("md", "\n".join(md)), ("csv", buf.getvalue()), ("tex", "\n".join(tex))):
        write_text(out / f"table3.{suffix}", text.rstrip("\n") + "\n")
        files.append(out / f"table3.{suffix}")
    return files


def collect_figures(out: Path) -> list[tuple[str, Path]]:
    """(caption, path) of the paper's figures that the finished runs allow, copied into OUT/figures."""
    runs = finished_runs(out)
    figs: list[tuple[str, Path]] = []
    dest = out / "figures"
    dest.mkdir(parents=True, exist_ok=True)

    def first(pred) -> object | None:
        return next((r for r in sorted(runs, key=lambda r: r.seed) if pred(r)), None)

    cuba = first(lambda r: r.label == "cuba-fra") or first(lambda r: r.label.startswith("cuba-"))
    if cuba is not None:
        for fig, src, cap in (("fig4", "figures/triggers.png", "Fig. 4: clean, backdoor and amplified residual"),
                              ("fig5", "figures/confidences.png", "Fig. 5: confidence of backdoor images, 3 per true class"),
                              ("fig5b", "figures/histograms.png", "Fig. 5 (companion): backdoor predictions per source class")):
            if (cuba.path / src).is_file():
                figs.append((f"{cap} ({cuba.path.name})", Path(shutil.copy(cuba.path / src, dest / f"{fig}-{cuba.path.name}.png"))))
    for fig, name, png, cap in (("fig6", "strip", "strip_entropy.png", "Fig. 6: STRIP entropy"),
                                ("fig7a", "neural-cleanse", "neural_cleanse.png", "Fig. 7a: Neural Cleanse norms"),
                                ("fig7b", "sentinet", "sentinet_scatter.png", "Fig. 7b: SentiNet")):
        for r in runs:
            src = r.path / "defenses" / name / png
            if src.is_file():
                figs.append((f"{cap} ({r.path.name})", Path(shutil.copy(src, dest / f"{fig}-{r.path.name}.png"))))
    fig8 = [r.path for r in runs if r.label in ("cuba-fra", "untargeted-ce-fra", "push-away-fra")]
    if len({p.name.rsplit("-s", 1)[0] for p in fig8}) > 1:
        from ..compare import compare

        _, files = compare(fig8, out=dest, name="fig8", source_class=1)
        figs.append(("Fig. 8: source class 1, CUBA FRA vs the untargeted baselines", dest / "fig8-source1.png"))
    return figs


def _verdict_class(cell: str) -> str:
    """A detector-matrix cell's colour class: green when the defender wins (caught / clear), red
    when the attacker does (missed / false alarm), amber when the seeds of a folded cell disagree
    (mixed), grey for n/a and for a rule that could not decide (no verdict, undecided); none for any
    other cell."""
    from ..defenses.summary import MIXED, NO_VERDICT
    from ..defenses.verdict import DEFENDER_WINS, VERDICT_SEP, VERDICTS

    word = html.unescape(cell).split(VERDICT_SEP)[0]
    if word == MIXED:  # the matrix folded over seeds: the models of one group got different verdicts
        return " class='mixed'"
    if word in VERDICTS:
        return " class='win'" if word in DEFENDER_WINS else " class='lose'"
    return " class='na'" if cell.startswith(("n/a", NO_VERDICT, "undecided")) else ""


def _md_table_to_html(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return "<p>(no rows yet)</p>"
    cells = lambda ln: [html.escape(c.strip()) for c in ln.strip().strip("|").split("|")]  # noqa: E731
    head = "".join(f"<th>{c}</th>" for c in cells(lines[0]))
    body = "".join("<tr>" + "".join(f"<td{_verdict_class(c)}>{c}</td>" for c in cells(ln)) + "</tr>" for ln in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _defended(out: Path, references: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(scored runs, reference runs): the finished runs with a defense.json, the grid's reference
    models (named in ``references``) apart."""
    defended = [r.path for r in finished_runs(out) if any((r.path / "defenses").glob("*/defense.json"))]
    refs = [p for p in defended if p.name in set(references)]
    return [p for p in defended if p not in refs], refs


def write_defense_table(out: Path, references: Sequence[str] = (), compare: dict[str, str] | None = None) -> Path | None:
    """``defenses.md``: every defense's headline numbers (AUROC, anomaly index, ...) per defended run;
    the finished runs named in ``references`` (the grid's reference models) calibrate the inversion
    detectors' flag instead of being scored (:func:`cuba.defenses.table.defense_tables`); the grid's
    ``compare`` adds the table against a baseline group, or a line saying it is not there yet."""
    from ..defenses.table import defense_tables

    scored, refs = _defended(out, references)
    if not scored:
        return None
    write_text(out / "defenses.md", defense_tables(scored, [p.name for p in scored], refs, compare, strict=False) + "\n")
    return out / "defenses.md"


def _img(path: Path, caption: str) -> str:
    """A figure embedded in the page (report.html is one offline file)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _matrix_figure(out: Path, references: Sequence[str]) -> Path | None:
    """OUT/figures/detector-matrix.png from the runs defenses.md was made of (None when no rule judged any)."""
    from ..defenses.table import matrix_figure

    scored, refs = _defended(out, references)
    path = out / "figures" / "detector-matrix.png"
    fig = matrix_figure(scored + refs, path, refs)
    if fig is None:
        path.unlink(missing_ok=True)  # a figure from an earlier report would show runs no longer judged
    return fig


def write_report(out: Path, title: str = "cuba reproduction report", blocked: list[dict] = (),
                 references: Sequence[str] = (), compare: dict[str, str] | None = None,
                 companions: Sequence[str] = ()) -> Path:
    """Tables, figures and configs of every finished run in one offline HTML file; ``blocked``
    (:func:`cuba.reproduce.tables.blocked_settings`) adds Table II rows for the grid's settings
    that could not run here, and says why under the table; ``compare`` as in :func:`write_defense_table`;
    ``companions``: the folders under ``out`` of the grids the same command runs after this one
    (``also``), linked to their own report.html."""
    out = Path(out)
    write_table3(out)
    t2_rows = table2_rows(finished_runs(out), blocked)
    t2 = table2_markdown(t2_rows)
    t3 = (out / "table3.md").read_text()
    dt = write_defense_table(out, references, compare)
    heatmap = _matrix_figure(out, references) if dt is not None else None
    # the headline table, then the model-level AUROCs and their notes; the removal curves between
    # them are Table III, shown above
    blocks = dt.read_text().strip().split("\n\n") if dt is not None else [""]
    detection = blocks[0]
    start = next((i for i, b in enumerate(blocks)
                  if b.startswith(("Across seeds", "Against ", "Model-level detectors", "Wall seconds"))), len(blocks))
    model_level = [_md_table_to_html(b) if b.lstrip().startswith("|") else f"<p>{html.escape(b)}</p>"
                   for b in blocks[start:]]
    links = ", ".join(f"<a href='{html.escape(c)}/report.html'>{html.escape(c)}</a>" for c in companions)
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>Run folder: {html.escape(str(out))}</p>",
             *([f"<p>Companion grids of the same command, each with its own report: {links}</p>"] if companions else []),
             "<h2>Table II: ASR, DS, CA (mean ± std over seeds), beside the paper</h2>", _md_table_to_html(t2),
             *(f"<p class='blocked'>{html.escape(note)}</p>" for note in blocked_notes(t2_rows)),
             f"<p>{html.escape(PROTOCOL_NOTE)}</p>", f"<p>{html.escape(TABLE2_NOTE)}</p>",
             "<h2>Table III: Fine-pruning and NAD (CA, ASR and ASR-C, %; the headline is ASR-C for untargeted "
             "attacks, ASR for the targeted controls)</h2>",
             # tables as tables; the notes under them (headline, †, ‡) as paragraphs, not dropped
             *(_md_table_to_html(block) if block.lstrip().startswith("|") else f"<p>{html.escape(block)}</p>"
               for block in t3.strip().split("\n\n")),
             "<h2>Defenses: each one's headline numbers per defended run</h2>",
             "<p>Definitions: the manual, docs/reference/defenses.md. CA/ASR in %; times are wall seconds. Green: the "
             "detector's own rule caught the backdoor (input-level: it lets at most 5% of backdoor inputs through) or "
             "cleared a clean model; red: it missed the backdoor or flagged a clean model; grey: not applicable, or its rule "
             "could not decide (no verdict / undecided: e.g. an inversion detector's flag with every budget beyond "
             "its schedule).</p>" + _md_table_to_html(detection),
             *model_level, *([_img(heatmap, "The detector matrix folded over seeds: colour, the share of each group's "
                                  "models the detector's own rule decided on which it won for the defender (hatched: "
                                  "some models undecided or n/a); text, won k of the group's n models, how many got no "
                                  "verdict or were n/a, and the mean AUROC")] if heatmap else []),
             "<h2>Figures</h2>"]
    parts += [_img(path, caption) for caption, path in collect_figures(out)]
    parts.append("<h2>Runs and their configs</h2>")
    for run in finished_runs(out):
        cfg = html.escape(yaml.safe_dump(run.config, sort_keys=False))
        parts.append(f"<details><summary>{html.escape(run.path.name)}</summary><pre>{cfg}</pre></details>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f2f2f2}.win{background:#dff0d8}.lose{background:#f2dede}.mixed{background:#fcf3d9}.na{color:#777}.blocked{color:#a40000;font-weight:bold}img{max-width:min(100%,900px)}figure{margin:1.5em 0}figcaption{color:#555;font-size:13px}")
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    write_text(out / "report.html", page)
    return out / "report.html"
