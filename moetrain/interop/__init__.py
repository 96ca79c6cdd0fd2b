"""Models in and out of moetrain: Hugging Face transformers export and import (`hf`), a
run's parameters as flat NumPy dicts (`params`), warm starts and sparse upcycling
(`upcycle`)."""
