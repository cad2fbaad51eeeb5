"""The error classes every layer raises and the entry points report.

A `UserError` is a mistake the user can fix (bad input, a missing file); its message names the value,
the limit and the fix, and the entry points print it as one `error:` line and exit 2, without a
traceback. `Interrupted` is a stop on request (a preemption signal) whose progress is saved.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names value, limit and fix."""


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message names key, value and fix."""


class Interrupted(Exception):
    """Work stopped on request (a preemption signal) after saving its progress; rerunning resumes it."""
