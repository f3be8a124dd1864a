"""Tools around the dataset: a synthetic dataset in upstream's layout, and the end-to-end demo."""
