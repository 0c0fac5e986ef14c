"""Every method registers itself here (one explicit list, in order)."""

from itmatch.models import vsepp, vsrn  # noqa: F401
