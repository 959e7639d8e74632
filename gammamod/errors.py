"""The one exception type users see. The CLI prints its message on one line and exits 2."""


class GammamodError(Exception):
    """A user-facing error: bad input, missing file, unsupported configuration.

    The message names the file or argument at fault and what was expected, on one line.
    """
