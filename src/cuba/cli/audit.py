"""``cuba defend``, ``cuba defense-table`` and ``cuba import-model``: the auditor's commands."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .common import parse_set

def cmd_defend(args: argparse.Namespace) -> int:

    from ..defenses import DEFENSES, load_attack_run, run_defense
    from ..defenses.model_level import load_references, model_group

    names = list(DEFENSES) if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in DEFENSES:
        raise ConfigError(f"defense: must be one of {', '.join(DEFENSES)} or all, got {args.name!r}")
    params = parse_set(args.set, "PARAM", sections=False)
    out = Path(args.out) if args.out else None
    # every defense's parameters checked before any runs: a bad value for the last one must not
    # cost the hours of the first ones; with "all", a --set no defense takes is a typo
    accepted = {name: set(inspect.signature(DEFENSES[name].__init__).parameters) - {"self"} for name in names}
    unknown = sorted(set(params) - set().union(*accepted.values()))
    if unknown:
        raise ConfigError(f"--set: no defense takes the parameter {', '.join(unknown)}" if args.name == "all"
                          else f"--set: {args.name} has no parameter {', '.join(unknown)}")
    for name in names:
        DEFENSES[name].checked(**{k: v for k, v in params.items() if k in accepted[name]})
    if args.reference and not any(DEFENSES[n].has_reference_rule() for n in names):
        raise ConfigError(f"--reference: {args.name} has no reference rule; only "
                          f"{', '.join(n for n in DEFENSES if DEFENSES[n].has_reference_rule())} decide their flag "
                          "from clean references")
    fixed = sorted({"reference_budget", "reference_budgets"} & set(params))
    if args.reference and fixed:
        raise ConfigError(f"--reference: give the references or --set {fixed[0]}, not both (either decides the flag)")
    run = load_attack_run(args.run_dir, device=args.device, data_dir=args.data_dir)  # after the checks: it loads data
    refs = {n: load_references([Path(p) for p in args.reference], n, model_group(run.run_dir), run.run_dir,
                               DEFENSES[n].checked(**{k: v for k, v in params.items() if k in accepted[n]}).params)
            for n in names if args.reference and DEFENSES[n].has_reference_rule()}
    for name in names:
        res = run_defense(name, run, out, **{k: v for k, v in params.items() if k in accepted[name]})
        fields, note = res.fields, ""
        if name in refs:
            fields, note = _flag_with_references(name, run.run_dir, (out or run.run_dir / "defenses") / name, refs[name])
        print(f"{name:<15} {DEFENSES[name].headline(fields)}  ({res.seconds:.0f} s){note}", flush=True)
    print(f"defense.json and figures in {(out or run.run_dir / 'defenses')}/<defense>/")
    return 0


def _flag_with_references(name: str, run_dir: Path, folder: Path, refs: Any) -> tuple[dict[str, Any], str]:
    """Decide ``flagged`` of the defense.json just written in ``folder`` from the references' scores
    (the rule of ``cuba defense-table --reference``) and write it back; (its fields, a note)."""
    from ..defenses import DEFENSES
    from ..defenses.model_level import apply_references
    from ..runs import read_json, write_json

    res = [(run_dir, {name: read_json(folder / "defense.json")})]
    try:
        notes = apply_references(res, refs, {name: DEFENSES[name]})
    except ConfigError as e:  # what the run resolved (a null parameter, bf16 or not) differs from the references
        raise ConfigError(f"{e} -- {folder / 'defense.json'} is kept without a flag") from None
    write_json(folder / "defense.json", res[0][1][name])
    return res[0][1][name], "".join(f"\n  {n.replace('; they are not among the runs above.', '.')}" for n in notes if n)


def cmd_defense_table(args: argparse.Namespace) -> int:
    from ..defenses.table import defense_tables
    from ..runs import write_text

    names = args.names.split(",") if args.names else None
    if names and len(names) != len(args.runs):
        raise ConfigError(f"--names: give one name per run ({len(args.runs)}), got {len(names)}")
    if args.against is not None and args.baseline is None:
        raise ConfigError("--against: needs --baseline (the group the others are set against)")
    compare = {"baseline": args.baseline, "against": args.against or ""} if args.baseline else None
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"--plot {args.plot}: the figure's file must end in .png, .pdf or .svg")
    md = defense_tables([Path(r) for r in args.runs], names, [Path(r) for r in args.reference or []], compare)
    print(md)
    if args.out:
        write_text(Path(args.out), md + "\n")
        print(f"\nwritten: {args.out}")
    if args.plot:
        from ..defenses.table import matrix_figure

        fig = matrix_figure([Path(r) for r in args.runs], Path(args.plot), [Path(r) for r in args.reference or []])
        print(f"written: {fig}" if fig else "--plot: no detector's rule judged these runs; no figure written")
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from ..importing import import_model

    parse = lambda v: [float(x) for x in v.split(",")] if v else None  # noqa: E731
    run_dir = import_model(args.weights, args.out, args.model, args.dataset, args.data_dir, args.allow_pickle,
                           parse(args.mean), parse(args.std))
    m = json.loads((run_dir / "metrics.json").read_text())
    print(f"imported {args.weights} -> {run_dir} (CA {100 * m['ca']:.2f}%); audit it with: cuba defend all {run_dir}")
    return 0


def add_parsers(sub: Any) -> None:
    from ..defenses import DEFENSES
    from ..models import CLASSIFIERS

    f = sub.add_parser("defend", help="run a defense (or all) on a trained run; writes defense.json + figures")
    f.add_argument("name", help=" | ".join([*DEFENSES, "all"]))
    f.add_argument("run_dir", help="a run folder, or a pack made by cuba pack (then --out is required)")
    f.add_argument("--data-dir", default=None, help="folder holding the run's data set (for a run or pack made elsewhere)")
    f.add_argument("--out", default=None, help="folder for <defense>/defense.json (default RUN_DIR/defenses)")
    f.add_argument("--device", default="auto")
    f.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE", help="a defense parameter, e.g. --set n_eval=500")
    f.add_argument("--reference", nargs="+", default=None, metavar="REF_RUN",
                   help="clean models you trained (each already scored by the same detector): trigger and dispersion "
                        "inversion decide the suspect's flag from their scores and write it to defense.json")
    f.set_defaults(func=cmd_defend)
    dt = sub.add_parser("defense-table", help="defenses x runs table from the runs' defense.json files")
    dt.add_argument("runs", nargs="+", metavar="RUN_DIR")
    dt.add_argument("--names", default=None, help="comma-separated column names (default: each run's setting)")
    dt.add_argument("--out", default=None, help="write the Markdown here too")
    dt.add_argument("--reference", nargs="+", default=None, metavar="RUN_DIR",
                    help="clean models the defender trained: they decide the inversion detectors' flag and are "
                         "left out of the scored runs (and of every AUROC)")
    dt.add_argument("--baseline", default=None, metavar="GROUP",
                    help="add a table of every detector on each group of runs against this one, e.g. cuba-fra "
                         "(a group: run names less -s<seed> and their shared prefix)")
    dt.add_argument("--against", default=None, metavar="PREFIX",
                    help="with --baseline: only the groups whose run names hold this from a dash on, e.g. cuba-adaptive")
    dt.add_argument("--plot", default=None, metavar="PNG",
                    help="also draw the matrix folded over seeds as a heatmap (share of models each rule won on)")
    dt.set_defaults(func=cmd_defense_table)
    im = sub.add_parser("import-model", help="make a run folder from someone else's classifier weights (to audit it)")
    im.add_argument("weights", help=".safetensors, or a pickle .pt/.pth with --allow-pickle")
    im.add_argument("--model", required=True, help=" | ".join(CLASSIFIERS))
    im.add_argument("--dataset", required=True)
    im.add_argument("--data-dir", default=None)
    im.add_argument("--out", required=True, help="run folder to create (new or empty)")
    im.add_argument("--allow-pickle", action="store_true", help="read a pickle file with torch.load(weights_only=True)")
    im.add_argument("--mean", default=None, help="input normalisation of a bare backbone, e.g. 0.1307")
    im.add_argument("--std", default=None, help="e.g. 0.3081")
    im.set_defaults(func=cmd_import_model)
