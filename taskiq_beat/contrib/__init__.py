"""Optional integrations with other frameworks; each needs its extra (``taskiq-beat[fastapi]``)."""
