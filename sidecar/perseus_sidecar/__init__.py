"""Perseus node agent: locks GPU clocks per instruction, measures energy, reports timings."""
