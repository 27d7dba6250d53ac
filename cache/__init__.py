"""tollway cache package."""
