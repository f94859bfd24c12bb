"""`make plots`: `dvc plots show` as a page that works offline.

DVC's HTML loads vega from a CDN, so the page is blank without network. We fetch the same
libraries from the npm registry once (npm pack, cached in .cache/vega), inline them into an HTML
template, and pass it with `--html-template`.

    python -m lmtune.tools.plots          # writes .cache/dvc-plots-offline.html, prints its path
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

# The versions DVC's own page asks the CDN for (dvc_render): the specs it writes match them.
PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
CACHE = Path(".cache/vega")
TEMPLATE = Path(".cache/dvc-plots-offline.html")


def library(name: str, version: str) -> str:
    """The package's minified browser build, from `npm pack` (a tarball from the registry)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"{name}-{version}.tgz"
    if not tarball.exists():
        out = subprocess.run(
            ["npm", "pack", f"{name}@{version}", "--silent"],
            cwd=CACHE,
            capture_output=True,
            text=True,
            check=True,
        )
        (CACHE / out.stdout.strip().splitlines()[-1]).rename(tarball)
    with tarfile.open(tarball) as archive:
        member = archive.extractfile(f"package/build/{name}.min.js")
        return member.read().decode()


def build() -> Path:
    scripts = "\n".join(f"<script>{library(n, v)}</script>" for n, v in PACKAGES.items())
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    # {plot_divs} is the one placeholder DVC fills; {scripts} (the CDN tags) is left out on purpose.
    TEMPLATE.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>lmtune plots</title>\n"
        "<style>body{font-family:system-ui,sans-serif;margin:2em} div{margin-bottom:2em}</style>\n"
        f"{scripts}\n</head><body><h1>lmtune: training curves</h1>\n{{plot_divs}}\n</body></html>\n"
    )
    return TEMPLATE


if __name__ == "__main__":
    try:
        print(build())
    except (OSError, subprocess.CalledProcessError) as err:
        sys.exit(f"error: could not fetch vega from the npm registry ({err}); is npm installed?")
