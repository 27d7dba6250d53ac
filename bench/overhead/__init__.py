"""bench/overhead: the gateway's own cost, tollway vs the same upstream called directly."""
