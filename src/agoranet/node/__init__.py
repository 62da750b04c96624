"""Layer 4: node roles (provider, gateway, verifier, storage) composed in one process."""
