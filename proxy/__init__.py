"""pgwarden: an access-control proxy for PostgreSQL."""

__version__ = "0.1.0"
