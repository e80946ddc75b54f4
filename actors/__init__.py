"""A Trio actor runtime: actors with bounded mailboxes, supervision and children.

See docs/actors.md for the guide.
"""

from ._actor import DEFAULT_MAILBOX_SIZE, Actor, Later, handles, later
from ._errors import (
    ActorError,
    ActorFailed,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    UnhandledMessage,
)
from ._runtime import ActorRef
from ._supervision import ESCALATE, RESTART, STOP, Backoff, Policy
from ._system import ActorSystem, open_system

__all__ = [
    "DEFAULT_MAILBOX_SIZE",
    "ESCALATE",
    "RESTART",
    "STOP",
    "Actor",
    "ActorError",
    "ActorFailed",
    "ActorRef",
    "ActorStopped",
    "ActorSystem",
    "AskTimeout",
    "Backoff",
    "Later",
    "MailboxFull",
    "Policy",
    "UnhandledMessage",
    "handles",
    "later",
    "open_system",
]
