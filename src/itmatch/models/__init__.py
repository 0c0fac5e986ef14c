"""Every method registers itself here (one explicit list, in order)."""

from itmatch.models import (
    scan,  # noqa: F401
    vsepp,  # noqa: F401
)
