"""The manual (mkdocs.yml + docs/) builds with ``mkdocs build --strict``, its API reference is rendered
from the docstrings, and the pages that restate code (the CLI reference, the add-a-defense example)
match the code. The last test opens the built site in headless Chromium (skipped without it)."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
PAGES = ("index.html", "quickstart/index.html", "concepts/index.html", "tutorials/reproduce-table2/index.html",
         "tutorials/add-a-defense/index.html", "tutorials/read-the-report/index.html", "cli/index.html",
         "api/index.html")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One strict build of the manual into a temporary folder (a few seconds)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}  # the banner of mkdocs-material 9.7+
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    return proc, out


def built(site: tuple[subprocess.CompletedProcess, Path]) -> Path:
    proc, out = site
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def test_manual_builds_strict_with_the_api_from_docstrings(site: tuple[subprocess.CompletedProcess, Path]) -> None:
    out = built(site)
    missing = [p for p in PAGES if not (out / p).is_file()]
    assert not missing, missing
    api = (out / "api" / "index.html").read_text()
    # rendered by mkdocstrings from the docstrings, not written by hand
    assert 'id="cuba.attack.step.joint_loss"' in api and "alpha * MSE + beta * CE(clean)" in api
    for module in ("cuba.api", "cuba.config", "cuba.attack.losses", "cuba.metrics", "cuba.runs", "cuba.pack", "cuba.defenses.base",
                   "cuba.train"):
        assert f'id="{module}"' in api, module
    assert 'id="cuba.defenses.base.AttackRun.clean_val"' in api
    # docs/griffe_docstrings.py ran: no Sphinx role is left as text
    assert ":func:`" not in api and ":data:`" not in api
    # the build helper is not published as a file of the site
    assert not (out / "griffe_docstrings.py").exists()


def test_cli_reference_has_every_command_and_flag() -> None:
    """docs/cli.md is written by hand from --help: every command has its section and every option
    string of the parser appears, so a new flag fails here until it is documented."""
    from cuba.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"train", "demo", "evaluate", "figures", "defend", "defense-table", "import-model", "pack", "reproduce", "bench",
            "compare", "sweep"} <= set(sub.choices)
    missing = []
    for name, parser in sub.choices.items():
        if not re.search(rf"^## {re.escape(name)}$", text, re.MULTILINE):
            missing.append(f"section ## {name}")
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and not re.search(re.escape(flag) + r"(?![\w-])", text):
                    missing.append(f"{name} {flag}")
    assert not missing, missing


def test_add_a_defense_example_follows_the_contract() -> None:
    """The example module of docs/tutorials/add-a-defense.md imports, registers under its name, takes
    its parameters from __init__'s signature, validates them in one line, and says n/a; it is
    removed from the registry afterwards."""
    from cuba.config import ConfigError
    from cuba.defenses import DEFENSES, Defense

    page = (DOCS / "tutorials" / "add-a-defense.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, re.DOTALL)[0]
    assert "max-softmax" not in DEFENSES
    before = list(DEFENSES)
    try:
        module = types.ModuleType("max_softmax_example")
        exec(compile(code, "max_softmax.py", "exec"), module.__dict__)  # noqa: S102 -- our own docs page
        cls = DEFENSES["max-softmax"]
        assert issubclass(cls, Defense) and cls is module.MaxSoftmax
        assert set(inspect.signature(cls.__init__).parameters) - {"self"} == {"n_eval", "n_calib", "seed"}
        assert cls(n_eval=10).params == {"seed": 0, "n_eval": 10, "n_calib": 1000}
        with pytest.raises(ConfigError, match=r"^n_eval: must be an integer >= 2, got 1$"):
            cls(n_eval=1)
        assert cls.headline({"applicable": False, "reason": "scores are constant"}) == "n/a (scores are constant)"
        fields = {"auroc": 0.75, "tpr_at_fpr_5pct": 0.5, "test_fpr_at_fpr_5pct": 0.04}
        assert cls.headline(fields) == "AUROC 0.750, TPR@FPR5% 0.500 (test FPR 0.040)"
    finally:
        DEFENSES.pop("max-softmax", None)
    assert list(DEFENSES) == before


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt install chromium)")
def test_manual_renders_in_headless_chromium(site: tuple[subprocess.CompletedProcess, Path], tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    page = built(site) / "index.html"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r"<title>\s*cuba\s*</title>", dom), dom[:2000]
    assert "Install and try it" in dom and "cuba demo" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert (img.min(axis=2) < 200).mean() > 0.01  # text was drawn, not a blank page
