"""The model side: architectures (adapters), loading, packaged assets and texts, scoring, planning, pruning, healing."""
