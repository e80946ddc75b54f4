"""The broker protocol's events, for people who write or test brokers."""

from bus._protocol import Ack, Cancel, Delivery, Nack, Receive, Register, Send

__all__ = ["Ack", "Cancel", "Delivery", "Nack", "Receive", "Register", "Send"]
