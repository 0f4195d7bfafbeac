"""In-pod entrypoints, one per stage (`nmm stage <name>`): parse args, call the library."""
