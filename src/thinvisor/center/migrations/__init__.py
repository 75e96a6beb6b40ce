"""The inventory's schema migrations (Alembic), run by ``thinvisor.center.db``."""
