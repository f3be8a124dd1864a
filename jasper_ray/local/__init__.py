"""One machine, torch: ``JASPERSteeringDataset``, its resumable samplers and loader, torch batches."""
