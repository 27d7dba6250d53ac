"""The usage ledger of record in PostgreSQL, the on-disk spool in front of it, and managed keys."""
