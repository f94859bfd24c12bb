"""mkdocs hook: pages that are generated from the repository at build time, so they cannot drift.

`<!-- config-reference -->` becomes the configuration reference read from conf/ and the schema;
`<!-- include PATH -->` becomes the file at PATH (relative to the repository root).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def on_page_markdown(markdown, page, config, files):
    if "<!-- config-reference -->" in markdown:
        from lmtune.tools.reference import markdown as reference

        markdown = markdown.replace("<!-- config-reference -->", reference())
    return re.sub(r"<!-- include (\S+) -->", lambda m: (ROOT / m[1]).read_text(), markdown)
