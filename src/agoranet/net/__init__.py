"""Layer 3: finding other nodes (discovery) and talking to them (peer and storage clients)."""
