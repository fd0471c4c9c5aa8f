"""Training: the trainable split, the optimizer and its schedule, the loss and the jitted steps."""
