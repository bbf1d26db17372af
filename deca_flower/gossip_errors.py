"""Errors of the gossip data plane (shared by :mod:`gossip` and :mod:`sealed_p2p`)."""

from __future__ import annotations

from typing import Any

__all__ = ["GossipError", "GossipSecurityError"]


class GossipError(RuntimeError):
    """A neighbour failed, timed out, or sent a block that does not fit.

    The message names the neighbour rank, what was expected and what arrived, and the
    setting to change. After a GossipError the group is unusable: call :meth:`GossipGroup.close`.
    """


class GossipSecurityError(GossipError):
    """A neighbour's data (or a store value) failed authentication.

    ``security_events`` lists the rejections as ``{"type": "security", "what", "from",
    "check", ...}`` records, for the node to return in its reply (``metrics.jsonl``).
    """

    def __init__(self, message: str, events: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.security_events = list(events)
