"""The one error base for requests the platform refuses (bad arguments, unknown names, bad data):
the CLI reports these on one line with exit status 2; anything else is a bug."""


class UserError(ValueError):
    """A request that cannot be done as asked; the message says what is wrong."""


class DataError(UserError):
    """A data file is missing or does not have the shape and content the loaders expect."""
