"""Layer 5: the `agora` command."""
