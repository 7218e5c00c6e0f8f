"""End-to-end tests: real processes, a real PostgreSQL database and a real Redis."""
