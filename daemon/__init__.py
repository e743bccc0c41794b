"""The service: config, state DB, HTTP API, auth, the atoll CLI."""
