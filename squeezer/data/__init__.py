"""Data files bundled with squeezer (see README.md here for sources and licences)."""
