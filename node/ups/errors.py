"""The exceptions of `node.ups`.

UpsError            base of every error node.ups raises on purpose
└── UpsRefused      a request on a workitem is refused; carries the PS3.4 CC status a DIMSE peer gets
                    (and the HTTP status UPS-RS answers)
"""

from __future__ import annotations

from node.errors import NodeError


class UpsError(NodeError):
    """Base class of every error node.ups raises on purpose."""


class UpsRefused(UpsError):
    def __init__(self, status: int, message: str, *, http_status: int = 409):
        super().__init__(message)
        self.status = status
        self.http_status = http_status
