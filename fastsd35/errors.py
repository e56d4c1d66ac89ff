"""User-facing errors: the CLI prints the message as one line on stderr and exits with status 2."""


class FastSD35Error(Exception):
    """A mistake in what the user asked for or supplied (not a bug): the message says what and what to do."""


class CheckpointError(FastSD35Error):
    """A checkpoint file or folder is missing, unreadable, truncated or holds weights for another model."""
