"""Look at memsurgery's TensorBoard output in a real browser (not a test).

Starts TensorBoard on 127.0.0.1 over a quickstart run (``runs/quickstart/tb``; run with
``memsurgery run recipes/quickstart.yaml`` first, or pass ``--run`` to have this script do it),
renders its Scalars, Custom Scalars and Images tabs in headless Chromium and saves
PNGs (``docs/img/tensorboard_<tab>.png``: the README's screenshots).

    python benchmarks/tensorboard_screenshots.py [--logdir runs/quickstart/tb] [--out docs/img] [--run]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from screenshot import crop_trailing, ensure_chromium  # noqa: E402

TABS = {"scalars": "#scalars", "custom_scalars": "#custom_scalars", "images": "#images"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url} within {timeout:.0f} s")


def shoot(chromium: str, url: str, png: Path, width: int, height: int, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    crop_trailing(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logdir", default=str(ROOT / "runs" / "quickstart" / "tb"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--run", action="store_true", help="run the quickstart first (about 2 minutes)")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=2400)
    ap.add_argument("--budget-ms", type=int, default=20000, help="virtual time for the page's scripts to load")
    args = ap.parse_args()
    logdir = Path(args.logdir)
    if args.run:
        subprocess.run([sys.executable, "-m", "memsurgery.cli", "run", str(ROOT / "recipes" / "quickstart.yaml")],
                       check=True, cwd=ROOT)
    if not any(logdir.rglob("events.out.tfevents.*")):
        raise SystemExit(f"no TensorBoard events under {logdir}: run `memsurgery run recipes/quickstart.yaml` (or --run)")
    chromium = ensure_chromium()
    port = free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                           "--port", str(port), "--reload_interval", "0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_up(base + "data/logdir")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, fragment in TABS.items():
            png = out / f"tensorboard_{name}.png"
            shoot(chromium, base + fragment, png, args.width, args.height, args.budget_ms)
            print(f"{name}: {png}")
    finally:
        tb.terminate()
        tb.wait(timeout=30)


if __name__ == "__main__":
    main()
