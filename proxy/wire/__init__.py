"""The PostgreSQL v3 wire protocol, sans I/O: bytes in, messages out, and back."""
