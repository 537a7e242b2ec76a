"""The services every protocol shares: ingest, query, retrieve and transfer syntax conversion."""
