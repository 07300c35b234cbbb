"""The bundled model server's own settings, read from the environment only.

They belong to the dev tool (``make run``, ``make local-llm``, the live tests),
not to the gateway: ``llm_service`` never reads them. Their names keep the
``LLM_SERVICE_`` prefix so one ``.env`` holds everything a developer sets;
``scripts/settings_doc.py`` writes their table into the README beside the
service's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "LLM_SERVICE"


class SettingError(ValueError):
    """A dev-tool setting has a value it cannot use."""


@dataclass(frozen=True)
class LocalSetting:
    """One environment variable of the bundled model server's tools."""

    name: str
    default: str
    help: str
    #: Accepted values (case-insensitive); empty: any text.
    choices: tuple[str, ...] = ()

    @property
    def env_var(self) -> str:
        return f"{PREFIX}_{self.name}"

    def read(self, environ: Mapping[str, str] | None = None) -> str:
        """The value in ``environ`` (default: ``os.environ``), checked."""
        environ = os.environ if environ is None else environ
        value = (environ.get(self.env_var) or "").strip() or self.default
        if self.choices:
            value = value.lower()
            if value not in self.choices:
                raise SettingError(
                    f"{self.env_var}={value!r}: expected one of "
                    f"{', '.join(self.choices)}"
                )
        return value


LOCAL_BACKEND = LocalSetting(
    "LOCAL_BACKEND",
    "auto",
    "`make run` only: start the bundled llama.cpp model server when nothing "
    "answers at a loopback upstream URL (`auto`), or never (`off`).",
    choices=("auto", "off"),
)
LOCAL_CACHE_DIR = LocalSetting(
    "LOCAL_CACHE_DIR",
    "~/.cache/llm-service",
    "Where the bundled llama.cpp server is installed and its model kept (a few "
    "hundred MB, plus the build).",
)

#: Every setting of the bundled model server's tools.
SETTINGS: tuple[LocalSetting, ...] = (LOCAL_BACKEND, LOCAL_CACHE_DIR)
