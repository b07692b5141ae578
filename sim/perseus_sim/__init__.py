"""The simulation and demo harness: a pipeline trainer on simulated GPUs that calls the real
training hooks against real sidecars (`trainer`, `rank`, `coordinator`), a local cluster of
operator and sidecar processes (`cluster`), the demos (`demo`, `nodedemo`, `nodejob`) and the
`perseus sim-train` subcommands (`commands`). It may import the operator, the sidecar and the hooks;
none of them imports it (the `perseus` CLI names its subcommand module as a string)."""
