"""The job: read, statistics or whole-series chunks, solve, write; its Ray adapter."""
