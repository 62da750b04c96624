"""Layer 3: inference engines behind one interface."""
