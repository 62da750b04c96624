"""Layer 3: talking to other peers over the network."""
