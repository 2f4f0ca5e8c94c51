"""Errors for user mistakes: each carries one line that names the file or key and the fix."""


class SpamclfError(ValueError):
    """A user mistake (bad file, config value, checkpoint). Its message is one line, shown without traceback."""


class DataError(SpamclfError):
    """A data file that cannot be used as given."""


class InvalidOption(SpamclfError):
    """A config value outside its allowed choices; `option` is the key, so callers can prefix its group."""

    def __init__(self, option: str, value, choices: str):
        self.option = option
        super().__init__(f"{option}={value!r} is not valid; choose {choices}")


class WeightsUnavailable(SpamclfError):
    """Pretrained weights that are neither cached nor downloadable."""


class CheckpointError(SpamclfError):
    """A checkpoint that is missing, corrupt or does not match its base weights."""
