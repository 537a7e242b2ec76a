"""What the tests share: helpers, fixtures and in-memory stand-ins.

Test modules import from here, never from one another."""
