"""Step counts and the per-step schedules of a run: guidance p(t), lr(t), HashNet's β(t) and the
Gumbel temperature τ(t)."""

import jax.numpy as jnp
import optax

from hashgnn_jax import config_lib


def steps_per_epoch(num_edges: int, batch_size: int) -> int:
  """Full batches in one pass over the training edges; the remainder waits for the next epoch."""
  if batch_size > num_edges:
    raise ValueError(f"config.train.batch_size={batch_size} exceeds the {num_edges} training "
                     "edges; lower it.")
  return num_edges // batch_size


def total_steps(train_config, per_epoch: int) -> int:
  if train_config.num_steps > 0:
    return int(train_config.num_steps)
  return max(1, int(round(train_config.num_epochs * per_epoch)))


def create_guidance_schedule(guidance_config, per_epoch: int) -> optax.Schedule:
  """p(step), the probability of keeping a continuous code bit (Q = 1)."""
  every = guidance_config.transition_steps
  if every <= 0:
    every = -every * per_epoch  # Negative: counted in epochs.
  every = max(int(every), 1)
  if guidance_config.schedule == "constant":
    return optax.constant_schedule(guidance_config.init)
  if guidance_config.schedule == "exponential":
    return optax.exponential_decay(
        init_value=guidance_config.init, transition_steps=every,
        decay_rate=guidance_config.decay_rate, staircase=True,
        end_value=guidance_config.floor)
  if guidance_config.schedule == "linear":
    init, decrement, floor = guidance_config.init, guidance_config.decrement, guidance_config.floor
    return lambda step: jnp.maximum(floor, init - decrement * (step // every))
  raise ValueError(f"config.guidance.schedule={guidance_config.schedule!r} is not one of "
                   f"{config_lib.SCHEDULES}.")


def create_beta_schedule(hash_config) -> optax.Schedule:
  """β(step) of HashNet's continuation tanh(β a): 1, then doubling every `beta_doubling_steps`
  once `beta_delay_steps` have passed, so tanh(β a) tends to sign(a)."""
  delay, doubling = hash_config.beta_delay_steps, hash_config.beta_doubling_steps
  return lambda step: 2.0 ** (jnp.maximum(step - delay, 0) / doubling)


def create_temperature_schedule(hash_config) -> optax.Schedule:
  """τ(step) of the Gumbel-softmax bits: tau_init halving every `tau_half_life_steps`, floored
  at tau_min (a relaxed bit tends to its hard sample as τ -> 0)."""
  init, floor = hash_config.tau_init, hash_config.tau_min
  half_life = hash_config.tau_half_life_steps
  return lambda step: jnp.maximum(floor, init * 2.0 ** (-step / half_life))


def create_learning_rate(train_config, num_steps: int) -> optax.Schedule:
  """lr(t) for the t-th update (t = 0 first), shared by optax Adam and the row-wise update."""
  peak, warmup = train_config.learning_rate, int(train_config.warmup_steps)
  if warmup >= num_steps:
    raise ValueError(f"config.train.warmup_steps={warmup} must be below the run's {num_steps} "
                     "steps.")
  if train_config.lr_schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(peak, num_steps - warmup,
                                               alpha=train_config.lr_end_fraction)
  elif train_config.lr_schedule == "constant":
    after_warmup = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.train.lr_schedule={train_config.lr_schedule!r} is not one of "
                     f"{config_lib.LR_SCHEDULES}.")
  if warmup == 0:
    return after_warmup
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup])
