"""Who is acting: set by the API for each request, read where events are written."""

from __future__ import annotations

from contextvars import ContextVar

#: The user on whose behalf the current request or task runs (None: the host itself).
current_user: ContextVar[str | None] = ContextVar("thinvisor_current_user", default=None)
