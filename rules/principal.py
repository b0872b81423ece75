"""Who is connected: the Principal every decision and audit event carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Principal:
    """A person authenticated by pgwarden itself (never the upstream service login).

    Built once at login; the policy engine reads it and the audit log records it,
    so it holds only facts established at connection time.
    """

    user: str
    role: str
    department: str | None
    attributes: dict[str, Any] = field(default_factory=dict)
    client_addr: str = ""
    client_port: int = 0
    application: str = ""
    session_id: str = ""
    tls: bool = False
    auth_method: str = ""
    database: str = ""
