"""Render linked demo mentions with ``spacy-m3el visualize`` and screenshot
the page with headless Chromium (Debian package ``chromium``).

    python scripts/screenshot_visualization.py training/clipart_mel/model-linker assets/readme/visualize.png
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets" / "clipart_mel"
MENTIONS = ("CA00213-m2", "CA00160-m1")  # two mentions of the test split


def main() -> int:
    pipeline, output = sys.argv[1], Path(sys.argv[2])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("headless Chromium is needed: apt-get install chromium", file=sys.stderr)
        return 1
    samples = {s["id"]: s for s in json.loads((DATA / "clipart_test.json").read_text())}
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.jsonl"
        rows.write_text("".join(json.dumps({"id": m, "text": samples[m]["sentence"],
                                            "image": str(DATA / "mention_image" / samples[m]["imgPath"])}) + "\n"
                                for m in MENTIONS))
        page = Path(tmp) / "page.html"
        subprocess.run([sys.executable, "-m", "spacy_m3el", "visualize", pipeline, str(rows), "--output", str(page),
                        "--max-candidates", "4"], check=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp}/profile", "--hide-scrollbars", "--window-size=1000,1150",
                        f"--screenshot={output.resolve()}", page.as_uri()], check=True, capture_output=True)
    print(f"Screenshot: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
