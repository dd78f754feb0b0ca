"""``cuba pack``: one shareable file per run, and reading it back as a run folder.

A pack (``model.cuba``) is a zip archive holding the run folder's result files -- weights
(safetensors), config, metrics, predictions and target sets, the validation split, history --
plus ``MODEL_CARD.md`` (what was trained, on what, its numbers, a misuse warning) and
``manifest.json``: the format name and version, the cuba and torch versions that wrote it, and
the sha256 of every member.

Why: backdoored models shared as bare weights lose what makes them auditable (which attack, which
target sets, which split), and links to loose resource files rot. One self-describing file with
checksums can be verified before anything in it is used. Reading never unpickles: weights are
safetensors, arrays are read with ``allow_pickle=False``.

A pack whose format version this cuba does not know, or whose checksums fail, is refused with
one line (:class:`PackError`). :func:`open_run` is how commands accept either a run folder or a
pack: a pack is verified and unpacked into a private temporary folder that lives until the
process exits, and the caller reads it through :class:`cuba.runs.RunFolder` like any run.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from .config import ConfigError
from .formatting import number, pct
from .runs import RunFolder, _atomic_write

FORMAT = "cuba-pack"
VERSION = 1
MANIFEST = "manifest.json"
CARD = "MODEL_CARD.md"
# the run folder's files a pack carries (figures and checkpoints stay behind: they are not results)
MEMBERS = ("config.yaml", "metrics.json", "status.json", "split.json", "history.json", "targets.json",
           "predictions.npz", "classifier.safetensors", "generator.safetensors")
REQUIRED = ("config.yaml", "metrics.json", "classifier.safetensors")


class PackError(ConfigError):
    """A pack that cannot be trusted or read: unknown format version, failed checksum, missing member."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_card(run: RunFolder) -> str:
    """MODEL_CARD.md: what the model is, how it was made, its numbers, and a warning."""
    cfg, m = run.config(), run.metrics()
    attacked = cfg.is_attack
    rows = [("clean accuracy (CA)", pct(m.get("ca"))), ("ASR", pct(m.get("asr"))), ("ASR-C", pct(m.get("asr_c"))),
            ("DS", pct(m.get("ds"))), ("trigger PSNR (dB)", number(m.get("psnr")))] if attacked else [("clean accuracy (CA)", pct(m.get("ca")))]
    val = m.get("val") if isinstance(m.get("val"), dict) else {}
    lines = [
        f"# {cfg.label()} -- {Path(str(cfg.dataset)).stem} / {cfg.model}",
        "",
        "**Warning: this model may contain a backdoor planted on purpose.** It was made with cuba, a toolkit "
        "for research on backdoor attacks and defenses. Use it to study or test defenses; do not deploy it, "
        "and do not pass it off as a clean model." if attacked else
        "A clean reference model made with cuba (no attack), for comparison with backdoored ones.",
        "",
        "## What it is",
        f"- data set: `{cfg.dataset}` ({m.get('num_classes', '?')} classes; {m.get('n_train', '?')} training, "
        f"{m.get('n_val', 0)} validation, {m.get('n_test', '?')} test images)",
        f"- classifier: `{cfg.model}`" + (f"; trigger generator: U-Net, `{cfg.generator_mode}` mode, L-inf bound {cfg.eps:g}"
                                        if attacked and cfg.attack not in ("badnets", "ubw-p") else ""),
        f"- attack: `{cfg.attack}`" + (f", variant `{cfg.variant}`" + (f" (k = {cfg.k}, vicinity `{cfg.vicinity}`)" if cfg.variant == "nra" else "")
                                      if attacked else " (clean)"),
        f"- training: {cfg.epochs:g} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}; "
        f"cuba {m.get('cuba', '?')}, torch {m.get('torch', '?')}, device {m.get('device', '?')}",
        "",
        "## Numbers (test set; % unless stated)",
        "",
        "| metric | value |" + (" validation |" if val else ""),
        "|---|---|" + ("---|" if val else ""),
    ]
    keys = {"clean accuracy (CA)": "ca", "ASR": "asr", "ASR-C": "asr_c", "DS": "ds", "trigger PSNR (dB)": "psnr"}
    for name, value in rows:
        v = val.get(keys[name])
        lines.append(f"| {name} | {value} |" + (f" {number(v) if keys[name] == 'psnr' else pct(v)} |" if val else ""))
    if m.get("degenerate"):
        lines += ["", f"**Degenerate run**: {m.get('degenerate_reason')} -- its ASR/DS are not a result."]
    lines += ["", "Definitions: see cuba's manual, Reference: metrics (docs/reference/runs.md). The pack's manifest.json lists a sha256 per file."]
    return "\n".join(lines) + "\n"


def pack_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the finished run in ``run_dir`` as one pack file ``out``; returns its path. An existing
    ``out`` is refused (a pack is what others were given), and so are weights that do not read."""
    from . import __version__

    run = RunFolder(run_dir).require(*REQUIRED[1:], finished=True)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise PackError(f"{out} is a folder; give the pack's file name, e.g. {out / 'model.cuba'}")
    if out.exists():  # a pack is what others were given: never replaced without being asked
        raise PackError(f"{out} exists; remove it first, or give another file name with --out")
    blobs = {name: (run.path / name).read_bytes() for name in MEMBERS if run.has(name)}
    for name in blobs:  # checksums prove the pack holds what the folder held, not that it was readable
        if name.endswith(".safetensors"):
            _check_weights(run.path / name)
    blobs[CARD] = model_card(run).encode()
    import torch

    manifest = {"format": FORMAT, "version": VERSION, "cuba": __version__, "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "run": run.path.name,
                "sha256": {name: _sha256(data) for name, data in sorted(blobs.items())}}

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
            for name, data in blobs.items():
                z.writestr(name, data)

    _atomic_write(out, write)
    return out


def _check_weights(path: Path) -> None:
    """A RunFileError unless ``path`` reads as safetensors (its header and every tensor's bytes)."""
    from safetensors.torch import load_file

    from .runs import reading

    with reading(path, "safetensors weights"):  # the one rule for naming an unreadable run file
        load_file(str(path))


def is_pack(path: str | Path) -> bool:
    """A file (not a folder) that is a zip archive with a manifest.json."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        return MANIFEST in z.namelist()


def read_pack(path: str | Path) -> dict[str, bytes]:
    """Every member of a verified pack, by name (the manifest included); :class:`PackError` if the
    format or version is unknown, a member is missing or extra, or a checksum fails."""
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            members = {name: z.read(name) for name in z.namelist()}
    except (zipfile.BadZipFile, OSError) as e:
        raise PackError(f"{p} is not a readable cuba pack: {e}") from None
    try:
        manifest = json.loads(members.pop(MANIFEST))
    except (KeyError, ValueError):
        raise PackError(f"{p} is not a cuba pack (no readable {MANIFEST})") from None
    if manifest.get("format") != FORMAT:
        raise PackError(f"{p} is not a cuba pack (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise PackError(f"{p}: pack format version {manifest.get('version')!r} is not known to this cuba "
                        f"(it reads version {VERSION}); upgrade cuba or re-pack the run")
    sums: dict[str, Any] = manifest.get("sha256") or {}
    if set(sums) != set(members):
        odd = sorted(set(sums) ^ set(members))
        raise PackError(f"{p}: members and manifest disagree ({', '.join(odd[:3])}); the pack was altered")
    bad = sorted(name for name, data in members.items() if _sha256(data) != sums[name])
    if bad:
        raise PackError(f"{p}: checksum failed for {', '.join(bad)}; the pack is damaged or was altered")
    missing = [n for n in REQUIRED if n not in members]
    if missing:
        raise PackError(f"{p}: pack lacks {', '.join(missing)}")
    return {MANIFEST: json.dumps(manifest).encode(), **members}


def unpack(path: str | Path, dest: str | Path) -> RunFolder:
    """Verify a pack and write its members into the folder ``dest``; returns it as a run."""
    members = read_pack(path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        if Path(name).name != name:  # members are flat; a path in a name would escape dest
            raise PackError(f"{path}: member name {name!r} is not a plain file name")
        (dest / name).write_bytes(data)
    return RunFolder(dest)


_UNPACKED: dict[Path, Path] = {}


def open_run(path: str | Path) -> RunFolder:
    """A run folder as it is, or a pack verified and unpacked into a temporary folder (removed when
    the process exits; unpacked once per process)."""
    p = Path(path)
    if not is_pack(p):
        return RunFolder(p)
    key = p.resolve()
    if key not in _UNPACKED:
        tmp = Path(tempfile.mkdtemp(prefix=f"cuba-pack-{p.stem}-"))
        atexit.register(shutil.rmtree, tmp, True)
        unpack(p, tmp / p.stem)
        _UNPACKED[key] = tmp / p.stem
    return RunFolder(_UNPACKED[key])
