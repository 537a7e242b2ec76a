"""The DIMSE adapter: association admission, handlers, the worker pool (PS3.7, PS3.8)."""
