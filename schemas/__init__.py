"""Table contracts: one field list per table, every schema derived from it."""
