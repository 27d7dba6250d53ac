"""tollway router package."""
