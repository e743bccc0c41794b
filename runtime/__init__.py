"""Running models: the content-addressed store, inference worker processes, the scheduler."""
