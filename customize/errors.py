"""The exception for mistakes a user can fix, shared by the engine, the methods and the recipes."""

from __future__ import annotations


class TrainingError(ValueError):
    """A training run refused for a reason the user can fix: a resume from a checkpoint written with other
    settings, a damaged checkpoint, an output folder that holds another run or cannot be written. The message
    names the setting to change. A ValueError, so the recipes and the `customize` command (customize.cli.USER_ERRORS)
    report it in one line instead of a traceback."""
