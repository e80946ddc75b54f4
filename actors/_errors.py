"""Exceptions raised by the actor runtime."""

from __future__ import annotations

__all__ = [
    "ActorError",
    "ActorFailed",
    "ActorStopped",
    "AskTimeout",
    "MailboxFull",
    "UnhandledMessage",
]


class ActorError(Exception):
    """Root of every exception the actor runtime raises."""


class MailboxFull(ActorError):
    """``tell_nowait`` found the actor's mailbox full."""


class ActorStopped(ActorError):
    """The actor is stopped, or stopped before it answered."""


class AskTimeout(ActorError, TimeoutError):
    """``ask`` got no answer within its timeout."""


class ActorFailed(ActorError):
    """An actor failed and its supervision policy escalated the failure.

    ``__cause__`` is the exception that made the actor fail.
    """


class UnhandledMessage(ActorError):
    """The actor has no handler for the message type it was asked about."""
