"""Exceptions whose message is one readable line for the user; the CLIs print it and exit."""


class IfaditError(Exception):
    """Base class: the message is shown to the user as is. Exit code 2 unless a subclass says."""

    exit_code = 2


class WeightsError(IfaditError):
    """A weights file is missing, of the wrong network, or of the wrong shape."""

    exit_code = 3


class InputError(IfaditError):
    """An input image, folder or argument cannot be used."""

    exit_code = 4


class NoFaceError(InputError):
    """A photo in which no face was found."""

    exit_code = 5


class SecretError(IfaditError):
    """The secret is missing, empty or unreadable. Never carries the secret itself."""

    exit_code = 6
