"""Build pipeline: ingest -> convert -> variants -> gate -> package."""
