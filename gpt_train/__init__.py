"""gpt-train: GPT pretraining from one CPU to a preemptible GPU cluster."""

__version__ = "0.1.0"
