"""The foundation: the one user-facing error, options, registries and the report's records."""
