"""The refusal every command shares: a configuration mmembed will not run, said before Ray starts."""


class UsageError(ValueError):
    """A configuration mmembed refuses before Ray starts; the message says what to do."""


EXIT_USAGE = 2
