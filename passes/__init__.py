"""FX passes: block discovery, partitioning, conditional cache branches."""
