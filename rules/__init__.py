"""The policy engine: YAML rules -> a Decision for every statement (pure, no I/O)."""
