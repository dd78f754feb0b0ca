"""Optional: report.html rendered by headless Chromium shows its tables and images (skipped without Chromium)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cuba.reproduce import expand, run_grid, write_report

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt install chromium)")
def test_report_renders_tables_and_images(tmp_path: Path) -> None:
    from PIL import Image

    grid = {"datasets": ["digits"], "attacks": ["none", "cuba"], "seeds": [0], "defenses": ["fine-pruning"],
            "set": {"epochs": 1, "generator_width": 4, "device": "cpu", "precision": "fp32"}}
    run_grid(expand(grid), tmp_path, log=lambda s: None)
    page = write_report(tmp_path)
    shot = tmp_path / "shot.png"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400",
            f"--screenshot={shot}", page.as_uri()]
    subprocess.run(args, capture_output=True, timeout=120, check=True)
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count("<table>") >= 2 and dom.count("<img") >= 2
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    ink = (img.min(axis=2) < 200).mean()  # text, table borders, figures
    colour = ((img.max(axis=2) - img.min(axis=2)) > 60).mean()  # the figures' coloured bars: images rendered
    assert ink > 0.02 and colour > 0.001, (ink, colour)
