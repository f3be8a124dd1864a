"""Conversion from upstream's PT layout to HDF5: the plan, its pieces, the single-process writer,
publishing, and the Ray driver that runs the pieces in parallel."""
