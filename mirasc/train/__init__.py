"""mirasc train: one trainer from a CPU to many GPUs."""
