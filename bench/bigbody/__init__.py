"""bench/bigbody: the gateway's RSS under big many-message request bodies."""
