"""The one exception type ZEDA raises for bad input; the CLI prints its message and exits 2."""


class ZedaError(ValueError):
    """A user-facing error: bad input, an unsupported model, or an inconsistent checkpoint."""
