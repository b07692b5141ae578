"""Perseus operator: EnergyPolicy reconciliation, the planner and the `perseus` CLI."""
