"""The application deployed by the end-to-end deployment test (worker, scheduler, clients)."""
