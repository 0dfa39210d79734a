"""One error type for bad input: it names the key, the value and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InputError(ValueError):
    """Raised for bad user input. The CLI turns it into one line and exit code 2.

    Parameters
    ----------
    message
        what is wrong, naming the parameter (Python name, e.g. ``n_top_genes``), the value and the fix.
    params
        the parameter names the message mentions; the command line rewrites each into its flag
        (``n_top_genes`` -> ``--n-top-genes``), so one message serves Python, config files and the CLI.
    """

    def __init__(self, message: str = "", params: tuple[str, ...] = ()):
        super().__init__(message)
        self.params = tuple(params)

    def __reduce__(self):  # keep params across pickling (bench --jobs workers)
        return type(self), (str(self), self.params)


def suggest(value: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' hint for ``value`` among ``choices`` ('' when nothing is close)."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=n, cutoff=0.5)
    if not close:
        low = {c.lower(): c for c in choices}
        close = [low[str(value).lower()]] if str(value).lower() in low else []
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_seed(seed, name: str = "seed") -> None:
    """Raise :class:`InputError` unless ``seed`` is an integer in [0, 2**32) (``name`` is used in the message)."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InputError(f"{name} must be an integer from 0 to 2**32 - 1, got {seed!r}.", params=(name,))


def choices_text(choices: Iterable[str], limit: int = 12) -> str:
    choices = sorted(str(c) for c in choices)
    more = f", ... ({len(choices) - limit} more)" if len(choices) > limit else ""
    return ", ".join(repr(c) for c in choices[:limit]) + more


class InputWarning(UserWarning):
    """Input that is usable but probably not what was meant (e.g. raw counts where log data is expected).

    The CLI prints it as one line ``warning: ...`` on stderr. Like :class:`InputError` it may carry
    ``params``, the parameter names its message mentions.
    """

    def __init__(self, message: str = "", params: tuple[str, ...] = ()):
        super().__init__(message)
        self.params = tuple(params)

    def __reduce__(self):  # keep params across pickling (bench --jobs workers)
        return type(self), (str(self), self.params)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) turned into an exception so that ``finally`` blocks and temporary-file cleanup run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def own_warning(category: type, filename: str) -> bool:
    """Whether a warning is perturbkit's own: an :class:`InputWarning`, or any warning raised from perturbkit's
    code (the CLI prints these; a bench cell records them)."""
    from pathlib import Path

    return issubclass(category, InputWarning) or str(filename).startswith(str(Path(__file__).parent))
