"""The refusals every command shares: a configuration mmembed will not run, said before Ray starts, and a
job that cannot go on, said instead of waiting."""


class UsageError(ValueError):
    """A configuration mmembed refuses before Ray starts; the message says what to do."""


class JobError(RuntimeError):
    """A job that cannot go on (its pools cannot be placed); the message says why and how to rerun."""


EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_NOT_BETTER = 4  # an --if-better gate kept CURRENT: the candidate did not reach CURRENT's figure
