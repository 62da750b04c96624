"""Layer 2: the replay rule that makes sampling checkable, tolerances, fraud proofs."""
