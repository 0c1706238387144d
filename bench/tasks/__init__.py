"""Task families. Every module here is imported by the registry; each registers its tasks."""
