"""The errors tl-noise raises.

Every error keeps its Python kind (a bad value is a ``ValueError``, a bad type a ``TypeError``, a
non-finite loss a ``FloatingPointError``), so ``except ValueError`` keeps working; each also
derives from :class:`TLNoiseError`, so ``except tl_noise.TLNoiseError`` catches them all.

>>> issubclass(TLNoiseValueError, ValueError) and issubclass(TLNoiseValueError, TLNoiseError)
True
"""

from __future__ import annotations


class TLNoiseError(Exception):
    """Base class of every error tl-noise raises on purpose."""


class TLNoiseValueError(TLNoiseError, ValueError):
    """A value outside its accepted range (the message names the value and the range)."""


class TLNoiseTypeError(TLNoiseError, TypeError):
    """An argument of the wrong type (the message names the type that was expected)."""


class TLNoiseFloatingPointError(TLNoiseError, FloatingPointError):
    """A non-finite loss or activation: the last finite state is kept."""


class RunFileError(TLNoiseValueError):
    """A file of a run directory that is not what tl-noise writes (malformed, oversized, a
    symbolic link): ``file`` is the file, ``field`` the part of it that is wrong ("" for the
    whole file). The dashboard shows it as a message."""

    def __init__(self, message: str, file: str = "", field: str = "") -> None:
        super().__init__(message)
        self.file = file
        self.field = field
