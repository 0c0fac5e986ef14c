"""Every method registers itself here (one explicit list, in order)."""

from itmatch.models import (  # noqa: F401
    gsmn,
    hrem,
    scan,
    vse_infinity,
    vsepp,
    vsrn,
)
