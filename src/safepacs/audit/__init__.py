"""The audit trail (issue: tamper-evident audit).  Nothing is recorded here yet."""
