"""Small in-memory stand-ins the unit tests share."""
