"""The user error every module may raise: a leaf module (it imports nothing), so that the
modules a config check calls can raise :class:`ConfigError` without importing the check."""


class ConfigError(ValueError):
    """A user error in the config: reported as one line, before anything expensive."""


#: The exit code of a run stopped by a :class:`ConfigError` (a usage error).
CONFIG_ERROR_EXIT = 2
