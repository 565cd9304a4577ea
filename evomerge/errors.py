"""The one error type users see: a one-line message naming the field, file or tensor."""


class EvomergeError(Exception):
    """Bad input or an impossible request. The CLI prints the message and exits with code 2."""

    exit_code = 2


class RecipeError(EvomergeError):
    """A merge recipe is malformed or asks for something impossible."""


class CheckpointError(EvomergeError):
    """A model directory or weight file cannot be read as asked."""


class ConfigError(EvomergeError):
    """A search config or search space is malformed."""


class ScoringError(EvomergeError):
    """A task, metric or model cannot be scored as asked."""


class SearchFailedError(EvomergeError):
    """A search ran to its end and no candidate scored: nothing to export or report."""

    exit_code = 1
