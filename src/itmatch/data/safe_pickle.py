"""Unpickling with an allow-list: the originals ship Python 2 pickles (vocabularies, image sizes) that must load
without running arbitrary code. Each use names the globals its files may reference; anything else is refused."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

from itmatch.errors import DataError


class AllowListUnpickler(pickle.Unpickler):
    """Reads Python 2 pickles (latin1 strings); `find_class` returns only what `ALLOWED` maps (module, name) to."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {}
    EXPECTED: ClassVar[str] = "a trusted file"  # what the refusal says the file should have been

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"refusing to load {self._path}: its pickle references {module}.{name}, which "
                            f"{self.EXPECTED} never contains") from None
