"""Errors that are the user's to fix (a path, a config value, a missing weight file).

The `forgelab` entry point prints these as one line and exits with status 2 instead of a stack trace: the message
itself must say what is wrong and what to do.
"""

from __future__ import annotations


class ForgelabError(Exception):
    """Base class of user-facing errors."""


class ConfigError(ForgelabError, ValueError):
    """A config value that cannot work (out of range, inconsistent with another value, unknown name)."""
