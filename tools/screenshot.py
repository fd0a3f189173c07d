"""Full-page PNG screenshot of a local HTML file with headless Chromium (Debian ``chromium``).

Chromium's ``--screenshot`` captures exactly the window, so for a full page this renders into a
tall window (default 6000 px) and then crops, with PIL, the trailing rows that equal the bottom
row's colour; when nothing could be cropped the page is taller than the window and it renders
again at twice the height.

    python tools/screenshot.py page.html out.png [--width 1400] [--height 6000] [--no-crop]

Installs Chromium with ``apt-get install -y chromium`` when ``/usr/bin/chromium`` is missing
(needs root). Launch flags are the ones that work as root in a container without a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
DEFAULT_HEIGHT = 6000
MAX_HEIGHT = 24000


def ensure_chromium() -> str:
    """Path of the Chromium binary, installing the Debian package if it is missing."""
    found = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if found:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    return CHROMIUM


def crop_trailing(png_path: str | os.PathLike[str], margin: int = 24) -> tuple[int, int]:
    """Crop rows at the bottom of the PNG that all equal the bottom-left pixel; returns the new
    (width, height). The height equals the original one when the content reaches the bottom."""
    import numpy as np
    from PIL import Image

    with Image.open(png_path) as im:
        img = im.convert("RGB")
    arr = np.asarray(img)
    bg = arr[-1, 0]
    rows = np.nonzero(np.any(arr != bg, axis=(1, 2)))[0]
    bottom = min(arr.shape[0], int(rows[-1]) + 1 + margin) if rows.size else arr.shape[0]
    img.crop((0, 0, arr.shape[1], bottom)).save(png_path)
    return arr.shape[1], bottom


def screenshot(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str], width: int = 1400,
               height: int | None = None, crop: bool = True, timeout: float = 120.0) -> Path:
    """Render ``html_path`` at ``width`` px with headless Chromium into ``png_path``.

    ``height=None`` (full page) renders a ``DEFAULT_HEIGHT`` px window and crops the trailing
    background; when the content still reaches the bottom it renders again at twice the height (up
    to ``MAX_HEIGHT``). An explicit ``height`` keeps exactly that window.
    """
    exe = ensure_chromium()
    html_file = Path(html_path).resolve()
    out = Path(png_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    win_h = height or DEFAULT_HEIGHT
    while True:
        if out.exists():
            out.unlink()
        with tempfile.TemporaryDirectory(prefix="memsurgery-chromium-") as profile:
            cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={width},{win_h}",
                   f"--screenshot={out}", html_file.as_uri()]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"chromium wrote no screenshot (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
        if not crop or height is not None:
            return out
        _, cropped = crop_trailing(out)
        if cropped < win_h or win_h >= MAX_HEIGHT:  # content ended inside the window (or give up)
            return out
        win_h = min(2 * win_h, MAX_HEIGHT)  # page taller than the window: render again, taller


def main(argv: list[str] | None = None) -> int:
    """Command line: ``screenshot.py page.html out.png [--width W] [--height H] [--no-crop]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=None, help=f"window height (default {DEFAULT_HEIGHT}, then cropped)")
    ap.add_argument("--no-crop", action="store_true", help="keep the full window height")
    args = ap.parse_args(argv)
    out = screenshot(args.html, args.png, width=args.width, height=args.height, crop=not args.no_crop)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
