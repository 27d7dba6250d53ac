"""tollway sim package."""
