"""The `perseus sim-train` subcommand (and its coordinator and rank modes), one module each."""
