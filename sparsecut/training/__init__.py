"""Training: the staged training loop behind `sparsecut train` (`train`), vision-encoder pre-training on
ShapesWorld (`pretrain_vision`), and training and scoring model variants with one recipe (`experiment`)."""
