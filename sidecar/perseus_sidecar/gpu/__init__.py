"""GPU backends behind one interface: NVML for real GPUs, a simulated GPU for tests and the demo."""
