"""The simulated pipeline trainer: runs real 1F1B dependencies on simulated GPUs and calls the real
training hooks against real sidecars, so the whole system runs without GPUs."""
