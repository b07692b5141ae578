"""Pure planner core: pipeline DAGs, energy model and the time/energy frontier (numpy + stdlib)."""
