"""tollway gateway package."""
