"""Layer 1: content identifiers, identities, canonical signed records, errors."""
