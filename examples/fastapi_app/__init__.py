"""Example: a FastAPI app that creates taskiq-beat jobs and manages them over HTTP."""
