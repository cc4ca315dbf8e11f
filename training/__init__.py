"""dinoforge training: data (multi-crop, block masking, collate, dataset loading), the Accelerate loop, checkpoints,
evaluation and Hub export."""
