"""What the programs' command lines share: one-line errors and the table-driven checks of flag values.

Every program (``lpjepa.train``, ``.eval``, ``.plot``, ``.export``) builds an
``ArgumentParser`` from here and runs its work inside ``usage_errors(parser)``: a
``UsageError`` raised anywhere below (a flag value out of range, a missing folder, an
unknown backbone) then ends the program as argparse's own errors do, with
``PROG: error: MESSAGE`` on stderr and exit code 2, never a traceback.

A program's flag values are checked against a table of ``Rule`` rows (one per flag:
what is allowed and how to say it) by ``check_rules``.
"""
import argparse
import contextlib
import math
import numbers
import os
from typing import Callable, NamedTuple, Union

# argparse's exit code for a bad command line; every UsageError exits with it too.
USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A flag value or an input path the program cannot use; its text names the flag, the value and the fix.

    The first line of the text is the error; further lines, when there are any, say how to fix it.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, ``PROG: error: MESSAGE``, without the usage block (exit code 2)."""

    def error(self, message):
        self.exit(USAGE_EXIT_CODE, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def usage_errors(parser):
    """Turn a ``UsageError`` raised inside into ``parser.error``: one line on stderr and exit code 2."""
    try:
        yield
    except UsageError as error:
        parser.error(str(error))


def flag(key):
    """The command-line flag of a config key: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


class Rule(NamedTuple):
    """One flag's check: ``ok(value, context)`` says whether the value is allowed; ``allowed`` says what is.

    ``allowed`` is a text, or a function of the context returning one (for limits that
    depend on other flags or on the machine). ``context`` is whatever the program passes
    to ``check_rules`` (the training program passes the whole config and the world size).
    """

    key: str
    ok: Callable
    allowed: Union[str, Callable]


def check_rules(values, rules, context=None):
    """Raise ``UsageError`` for the first rule whose value (in ``values``, a dict by key) is not allowed.

    A value that is None (a flag not given, with no default) is not checked.
    """
    for rule in rules:
        value = values.get(rule.key)
        if value is None or rule.ok(value, context):
            continue
        allowed = rule.allowed(context) if callable(rule.allowed) else rule.allowed
        raise UsageError(f"argument {flag(rule.key)}: invalid value {value}: {allowed}")


def _real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low):
    """A rule's ``ok``: an integer >= low."""
    return lambda value, context: isinstance(value, int) and value >= low


def finite_above(low):
    """A rule's ``ok``: a finite number > low."""
    return lambda value, context: _real(value) and value > low


def finite_at_least(low):
    """A rule's ``ok``: a finite number >= low."""
    return lambda value, context: _real(value) and value >= low


def finite(value, context=None):
    """A rule's ``ok``: any finite number."""
    return _real(value)


def valid_device(value, context=None):
    """A rule's ``ok`` for ``--device``: 'auto', or a name ``torch.device`` parses (cpu, cuda, cuda:1, ...)."""
    import torch

    if value == "auto":
        return True
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


DEVICE_ALLOWED = "auto, cpu, cuda or cuda:N (a torch device name)"


def require_existing_folder(flag_name, path):
    """``UsageError`` when the folder an output file ``path`` would go into does not exist.

    Programs refuse it rather than create it: a typo in the path would otherwise leave a
    folder somewhere unexpected and the file in it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"argument {flag_name}: the folder of {path} does not exist; create it first "
                         f"(mkdir -p {folder}) or name a file in an existing folder")
