"""The errors effopt raises on purpose. The CLI maps each to an exit code (README: exit codes)."""


class EffoptError(Exception):
    """Base of every deliberate effopt error."""


class InputError(EffoptError):
    """Invalid input (recipe, option, file): nothing runs, exit code 2."""


class RecipeError(InputError):
    """A recipe that does not validate. The message names file, line, key path and expectation."""


class StageError(EffoptError):
    """A stage failed at run time: exit code 3."""


class GateError(EffoptError):
    """At least one gate failed: exit code 1."""
