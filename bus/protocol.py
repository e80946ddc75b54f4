"""The messages of the bus's actors, for people who write, test or drive brokers.

See docs/concepts.md for who sends what to whom.
"""

from bus._protocol import (
    Ack,
    Cancel,
    CancelRunning,
    Delivery,
    Drain,
    DrainTicket,
    ForgetResult,
    GetProgress,
    GetResult,
    Inspect,
    Lease,
    Nack,
    Receive,
    Register,
    Release,
    Send,
    SetProgress,
    StoreResult,
    Unregister,
    Unwatch,
    Watch,
    Watcher,
)

__all__ = [
    "Ack",
    "Cancel",
    "CancelRunning",
    "Delivery",
    "Drain",
    "DrainTicket",
    "ForgetResult",
    "GetProgress",
    "GetResult",
    "Inspect",
    "Lease",
    "Nack",
    "Receive",
    "Register",
    "Release",
    "Send",
    "SetProgress",
    "StoreResult",
    "Unregister",
    "Unwatch",
    "Watch",
    "Watcher",
]
