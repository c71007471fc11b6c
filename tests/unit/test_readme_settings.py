"""The README's settings table matches the settings object: one row per field, named by its
`TENANTLORA_<NAME>` variable, no row for a variable that does not exist, and the default shown
where it is a simple literal. `tenantlora settings` prints rows to copy from."""

from __future__ import annotations

import re
from pathlib import Path

from serving.cli_serve import settings_table
from serving.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
ENV_PREFIX = Settings.model_config["env_prefix"]


def readme_rows() -> dict[str, list[str]]:
    """Variable -> cells of its row in the table under `## Settings`."""
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([A-Z0-9_]+)`", cells[0]) if line.startswith("|") else None
        if match:
            rows[match.group(1)] = cells
    return rows


def literal_default(name: str) -> str | None:
    """The default as the README writes it, for plain literals (not None, not computed)."""
    info = Settings.model_fields[name]
    value = info.default
    if info.default_factory is not None or value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, int | float | str) else None


def test_every_setting_has_a_row_and_every_row_a_setting() -> None:
    rows = readme_rows()
    expected = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert sorted(expected - set(rows)) == [], "settings missing from README (tenantlora settings)"
    assert sorted(set(rows) - expected) == [], "README rows for settings that do not exist"


def test_literal_defaults_match() -> None:
    rows = readme_rows()
    for name in Settings.model_fields:
        default = literal_default(name)
        row = rows.get(ENV_PREFIX + name.upper())
        if default is None or row is None:
            continue
        assert f"`{default}`" in row[2], f"{name}: README default {row[2]!r}, settings {default!r}"


def test_generated_table_has_a_row_per_setting() -> None:
    lines = settings_table().splitlines()
    assert lines[0] == "| environment | flag | default | meaning |"
    assert len(lines) == 2 + len(Settings.model_fields)
    assert "| `TENANTLORA_PORT` | `--port` | `8000` |" in settings_table()
