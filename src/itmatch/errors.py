"""Exceptions for user-facing problems.

Every error a user can cause (bad path, bad shape, unknown option, corrupt file) is an ``ItmatchError`` whose
message is one line naming the problem and the fix; ``itmatch.cli`` prints it without a traceback.
"""


class ItmatchError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class ConfigError(ItmatchError):
    """Unknown preset, unknown or ill-typed config key."""


class DataError(ItmatchError):
    """Missing, malformed or inconsistent dataset files."""


class CheckpointError(ItmatchError):
    """Missing, corrupt, unsafe or mismatched checkpoint."""


class TrainingError(ItmatchError):
    """Training cannot continue (for example a non-finite loss)."""


class GalleryIndexError(ItmatchError):
    """Missing, corrupt, stale or mismatched retrieval index (or a query that does not fit it)."""


class QueryError(ItmatchError):
    """A search query that cannot be answered as given: empty or too long text, k out of range, features or boxes
    of the wrong type, shape or values (`itmatch.validate`). The server answers it with 422."""
