"""User-facing errors: the CLI prints these as one line and exits non-zero, never with a traceback."""


class HistoError(Exception):
    """A mistake in the user's input (file, config, option) described in one line."""


class ConfigError(HistoError):
    """A configuration file or override that does not match the defaults' schema."""


class InputFileError(HistoError):
    """A file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
