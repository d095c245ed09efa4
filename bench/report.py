"""Writing a benchmark's result: the JSON and, beside it, its Markdown table."""
from __future__ import annotations

import json
import os


def write_json_md(out_json: str, res: dict, md: str) -> None:
    """Write `res` to `out_json` and `md` to the same path with .md; print the table."""
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.splitext(out_json)[0] + ".md", "w") as fh:
        fh.write(md)
    print(md)
