"""Universal anatomy: canonical structures with synonyms and declarative dataset templates."""
