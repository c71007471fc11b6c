"""Names that clients choose: adapter and tenant names share one pattern."""

from __future__ import annotations

import re

from adapters.errors import InvalidAdapter

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def check_adapter_name(name: str) -> None:
    if not is_valid_name(name):
        raise InvalidAdapter(
            f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(and start with a letter or digit)",
            "invalid_name",
        )
