"""Every method registers itself here (one explicit list, in order)."""

from itmatch.models import (
    vse_infinity,  # noqa: F401
    vsepp,  # noqa: F401
)
