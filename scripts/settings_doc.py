"""Print the settings as the README's markdown table or as ``.env.example``.

    python scripts/settings_doc.py table   # paste into README.md
    python scripts/settings_doc.py env > .env.example

Both come from ``llm_service.config.SETTINGS``, the one list of settings.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_service.config import SETTINGS


def _shown(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        default = _shown(setting.default)
        rows.append(
            f"| `{setting.env_var}` | {f'`{default}`' if default else 'none'} "
            f"| {setting.help} |"
        )
    return "\n".join(rows)


def env() -> str:
    lines = [
        "# llm-service settings: copy to .env (loaded by wsgi.py and the flask CLI).",
        "# Every line shows the default; uncomment and edit what you change.",
        "",
    ]
    for setting in SETTINGS:
        lines.append(f"# {setting.help.replace('`', '')}")
        lines.append(f"# {setting.env_var}={_shown(setting.default)}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "table"
    print(table() if which == "table" else env())
