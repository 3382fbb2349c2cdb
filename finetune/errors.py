"""The one exception type for user mistakes: the CLI prints it as a single line and exits with code 2."""


class UserError(ValueError):
    """Bad input that the user must fix: a recipe key, a data row, a model path, an output directory."""
