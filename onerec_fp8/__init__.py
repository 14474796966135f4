"""The `onerec-fp8` command line: the top layer, over onerec (library), ops and tasks (pipeline)."""
