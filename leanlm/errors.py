"""One exception type for problems the user can fix; the CLI prints it as one line and exits with status 2."""


class LeanLMError(Exception):
    """Bad input: a missing or corrupt file, an invalid config value, an unsupported model, ..."""
