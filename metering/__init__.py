"""tollway metering package."""
