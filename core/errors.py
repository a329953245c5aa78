"""The one base of every error a user can act on; pages and the CLI catch it in one place."""


class LensError(ValueError):
    """A problem with the user's input or setup; the message is one sentence meant for the user."""
