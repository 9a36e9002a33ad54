"""The commands: cli, demo, generate, plots, bench, peers."""
