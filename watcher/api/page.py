"""The status page: one self-contained HTML file (`page.html`, inline CSS, script and SVG)
with the first data embedded, so it shows at once and then refreshes itself from
`/status.json`. Its Content-Security-Policy lets it load nothing from anywhere else."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Any

import orjson

PAGE = resources.files("watcher.api").joinpath("page.html").read_text(encoding="utf-8")
_SCRIPT = re.search(r"<script>(.*?)</script>", PAGE, re.S).group(1)  # type: ignore[union-attr]
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # Only its own inline script (by its hash) and styles, and its own JSON.
    "Content-Security-Policy": (
        f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
}


def page_html(data: dict[str, Any]) -> str:
    # `<` escaped, so that no value (a file name, say) can end the element it is embedded in.
    embedded = orjson.dumps(data).decode().replace("<", "\\u003c")
    return PAGE.replace("__INITIAL__", embedded)
