"""Training stage: from a config and a data set to trained, checkpointed parameters.

`schedules` (guidance and learning rate), `optim` (row-wise Adam), `state` (the train state),
`sampler` (on-device subgraph batches), `step` (the pmapped train step and its stepper),
`checkpointing` (Orbax), `loop` (the training loop). `hashgnn_jax.experiment` assembles them.
"""
