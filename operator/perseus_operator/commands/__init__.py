"""Subcommands of the `perseus` CLI, one module each."""
