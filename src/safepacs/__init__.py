"""SafePACS: a PACS that is secure with zero configuration."""

__version__ = "0.1.0"

__all__ = ["__version__"]
