"""The configuration schema: paper defaults, named variants and validation.

The schema lives in the package (not only under configs/) so that a library user can build a
config without the command line, and so that every configs/*.py file stays a thin variant.
"""

import datetime
import math
import re

import ml_collections

from hashgnn_jax.data import formats

# The paper's comparison set (Sec. 5.2.2) besides HashGNN itself ("paper") and the authors' code,
# and the project's own default, HashGNN's model trained for its codes (`_COMPARISON_VARIANTS`).
VARIANTS = ("hashgnn_ib", "paper", "authors_code", "graphsage", "lsh", "hashgnn_sp", "hash_ste",
            "hashnet", "hash_gumb", "hashgnn_nr", "mf", "bprmf", "lightgcn_ib")
# What every configs/*.py file gives without ':variant' (BUILD_NOTES, "Code quality").
DEFAULT_VARIANT = "hashgnn_ib"
# Variants that start from another variant's trained run (config.train.init_from names its
# workdir): the prerequisite of each.
VARIANT_STAGES = {"lsh": "graphsage", "hashgnn_sp": "graphsage"}
HASH_METHODS = ("guided", "continuation", "gumbel", "random_projection", "identity")
ENCODERS = ("gnn", "embedding")
TRAINABLE = ("all", "hash", "none")
AGGREGATORS = ("gcn", "sage", "lightgcn")
GRANULARITIES = ("element", "node")
SCHEDULES = ("exponential", "linear", "constant")
LOGIT_SCALES = ("none", "inv_sqrt_bits", "inv_bits", "cosine")
RANK_LOSSES = ("hinge", "bpr")
EVAL_MODES = ("hamming", "hierarchical", "continuous")
PROTOCOLS = ("standard", "paper")
SAMPLER_MODES = ("node", "tree", "full")
TRIM_SETS = ("auto", "always", "never")
EMBEDDING_UPDATES = ("rowwise", "dense")
EMBEDDING_LAYOUTS = ("replicated", "sharded")
REQUEST_CAPACITIES = ("fitted", "full")
LR_SCHEDULES = ("constant", "cosine")
TIMESTAMP_UNITS = tuple(formats.TIMESTAMP_UNIT_DIGITS)
RATED_KINDS = ("movielens", "csv")  # csv only with config.data.columns.rating set.
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_END_TIME_FORMS = (
  "an ISO 8601 date or date-time, read as UTC unless it carries an offset ('2017-12-04', "
  "'2017-12-04T00:00:00', '2017-12-04T08:00:00+08:00'), integer Unix seconds ('1512345600'), "
  "or '' for the end of the log"
)


def default_config() -> ml_collections.ConfigDict:
  """Paper settings (WWW 2020, Sec. 4) on the embedded synthetic graph."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.kind = "synthetic"
  config.data.path = ""  # File or folder of real data; unused by 'synthetic'.
  config.data.seed = 0  # Seeds generation and the per-user split.
  config.data.test_fraction = 0.3  # Paper: 70/30 per user.
  # Share of each user's training interactions held out for validation (paper: 10%); 0 disables.
  config.data.valid_fraction = 0.0
  # random: per user, seeded; published: keep the files' train/test (LightGCN format);
  # temporal: by timestamp windows (Alibaba: six days train, the last day test).
  config.data.split = "random"
  config.data.train_days = 6.0  # temporal only.
  config.data.test_days = 1.0  # temporal only; the last `test_days` of the log.
  # temporal only: the window's end (exclusive), ISO 8601 UTC or Unix seconds; "": the log's end.
  config.data.end_time = ""
  # Rows rated below this are dropped on reading (e.g. 4.0 for implicit positives); -inf keeps all.
  config.data.min_rating = float("-inf")
  config.data.min_user_interactions = 0  # Users with fewer are dropped (Alibaba: 10).
  config.data.min_item_interactions = 0
  config.data.k_core = False  # Repeat both filters until stable.
  config.data.behaviors = formats.USER_BEHAVIOR_TYPES  # UserBehavior.csv types to keep.
  config.data.cache_dir = ""  # Prepared caches; "" means a folder beside the source.
  # Generic CSV / TSV / Parquet column mapping (names, or 0-based indices as strings).
  config.data.columns = ml_collections.ConfigDict()
  config.data.columns.user = "user"
  config.data.columns.item = "item"
  config.data.columns.timestamp = ""
  config.data.columns.rating = ""
  config.data.delimiter = ","
  config.data.header = True
  config.data.timestamp_unit = "s"  # Of integer csv/Parquet timestamps: s, ms, us or ns.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_users = 3_000
  config.data.synthetic.num_items = 2_000
  config.data.synthetic.num_communities = 20
  config.data.synthetic.mean_items_per_user = 30.0
  config.data.synthetic.min_items_per_user = 8
  config.data.synthetic.popularity_exponent = 1.0
  config.data.synthetic.in_community_prob = 0.8

  config.sampler = ml_collections.ConfigDict()
  # Neighbours sampled with replacement per node: first hop, then second hop.
  config.sampler.fanouts = (10, 5)
  config.sampler.num_negatives = 5  # Paper: 5 triplets per positive.
  # node: distinct nodes sample once per hop and are computed once (GraphSAGE minibatch);
  # tree: every target gets its own sampled tree (authors' code); full: no sampling, every layer
  # on the whole graph each step (fanouts then only count the layers; needs dense updates).
  # train/sampler.py has the details.
  config.sampler.mode = "node"
  # node mode: bound the node sets by sizes fitted on a few sampled batches where the sets are big
  # and that cuts a tenth of their slots (exact: a batch that does not fit runs again untrimmed;
  # the host waits for each step to know). auto: on CPU devices, whose steps are long; always;
  # never. train/sampler.fit_set_sizes has the rule.
  config.sampler.trim_sets = "auto"

  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 64  # Learned ID embedding (the public data sets have no attributes).
  config.model.input_dense = 0  # >0: dense + activation on the embedding first (authors: 68).
  # sage: W·[self ‖ mean(N)] (authors' code); gcn: W·mean(self ∪ N) (paper eq. 1), which
  # underfits here: HR@50 0.40 against 0.58 (Hamming) on this default (BUILD_NOTES.md);
  # lightgcn: Σ x_u / √(d_u d_v) with no weights or non-linearity, u the mean of all layers
  # (LightGCN; hidden_dims then all equal the embedding width).
  config.model.aggregator = "sage"
  config.model.hidden_dims = (128, 68)  # One entry per GNN layer; must match len(fanouts).
  config.model.use_bias = True
  config.model.leaky_relu_slope = 0.2
  config.model.hash_bits = 32  # K.
  config.model.separate_hash_layers = False  # Authors: one hash layer for users, one for items.
  config.model.init = "glorot"  # Dense kernels. normal: N(0, 0.02), the paper's; glorot: authors'.
  config.model.embed_init_std = 0.1  # ID embeddings ~ N(0, std²); the paper uses 0.02.
  # gnn: the hash layer reads the GNN's output; embedding: the layer-0 features themselves (MF:
  # no GNN parameters; the sampler still draws neighbours, which nothing reads).
  config.model.encoder = "gnn"

  # How training turns the hash layer's logits a = W u + b into codes; evaluation always takes
  # z = tanh(a) (identity: z = u) and its signs.
  config.hash = ml_collections.ConfigDict()
  # guided: tanh(a) mixed with its STE sign by the guidance mask (HashGNN); continuation:
  # tanh(β a), β growing (HashNet); gumbel: each bit a two-way Gumbel-softmax sample at
  # temperature τ; random_projection: a = tanh(W u + b)·R with a fixed Gaussian R (LSH);
  # identity: z = u, no hash layer (needs model.encoder='embedding'; u has hash_bits dimensions).
  config.hash.method = "guided"
  config.hash.beta_delay_steps = 200  # continuation: β = 1 for this many steps, then
  config.hash.beta_doubling_steps = 200  # doubles every so many steps.
  config.hash.tau_init = 1.0  # gumbel: τ starts here and halves every tau_half_life_steps,
  config.hash.tau_half_life_steps = 500
  config.hash.tau_min = 0.05  # down to this floor.
  config.hash.projection_seed = 0  # random_projection: seeds R.

  config.guidance = ml_collections.ConfigDict()
  config.guidance.granularity = "element"  # element: Q per bit; node: one Q per node row.
  # Node granularity only: a user and its positive item share one draw (authors' code).
  config.guidance.share_positive_draw = False
  config.guidance.schedule = "exponential"  # exponential | linear (staircase) | constant.
  config.guidance.init = 1.0  # p at step 0: fully continuous.
  config.guidance.decay_rate = 0.95  # exponential: p *= decay_rate every transition_steps.
  config.guidance.decrement = 0.02  # linear: p -= decrement every transition_steps.
  # <= 0 means "in epochs": -2 is every two epochs (authors' code).
  config.guidance.transition_steps = 250
  config.guidance.floor = 0.5  # Lower bound of p; the paper finds p < 0.5 hurts.

  config.loss = ml_collections.ConfigDict()
  config.loss.cross_weight = 1.0
  config.loss.rank = "hinge"  # hinge: eq. 6 on sigmoids; bpr: authors' code.
  config.loss.rank_weight = 0.5  # lambda.
  config.loss.margin = 0.2  # alpha (hinge only).
  # Inner products of ±1 codes lie in [-K, K] and saturate the sigmoid unscaled, yet unscaled
  # logits measured best (BUILD_NOTES.md, "Choices made by measurement").
  config.loss.logit_scale = "none"
  # Multiplies the scaled scores: with logit_scale inv_bits or cosine, ±1 codes score in [−t, t].
  config.loss.temperature = 1.0
  config.loss.learn_temperature = False  # True: a parameter, log t, starting at `temperature`.
  # Terms on the continuous codes z. binary: the losses again on sign(z) (straight-through),
  # scored ⟨h_u, h_i⟩ · binary_temperature / K; quant: (|z| − 1)²; balance: each bit's mean over
  # the batch's negative items, squared; decorr: their bits' off-diagonal second moments.
  config.loss.binary_weight = 0.0
  config.loss.binary_temperature = 6.0
  config.loss.quant_weight = 0.0
  config.loss.balance_weight = 0.0
  config.loss.decorr_weight = 0.0
  # A softmax of each user's positive against every positive of the (global) batch, scored like
  # the main term; more negatives per step at the cost of a [b, B] score matrix.
  config.loss.inbatch_weight = 0.0
  # Mixed negatives: each example's first so many uniform negatives (of sampler.num_negatives)
  # join the softmax's candidates, every candidate's logit then corrected by the log of its
  # expected count in the mixed set, log(d_j / E + m / I); 0: the positives alone (log d_j).
  config.loss.inbatch_negatives = 0

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256  # Positive edges per step, across all devices.
  config.train.learning_rate = 1e-3  # Peak rate; the paper keeps it constant.
  # constant, or cosine: decays from the peak to lr_end_fraction × peak over the run's steps.
  config.train.lr_schedule = "constant"
  config.train.lr_end_fraction = 0.0  # cosine only.
  config.train.warmup_steps = 0  # Linear warm-up from 0 to the peak first (either schedule).
  # rowwise: lazy Adam on the embedding rows a step touches, so a step's cost does not grow with
  # the catalogue (optim.py has the semantics); dense: optax Adam over the whole table.
  config.train.embedding_update = "rowwise"
  # rowwise only: AdamW's decoupled decay on the embedding rows a step trains (lazy: rows not
  # touched do not decay), lr · this · row added to each of their updates.
  config.train.embedding_weight_decay = 0.0
  # replicated: every device holds the whole table and both moments; sharded: each of the n
  # devices (all processes') owns 1/n of their rows and serves them to the others in the step
  # (train/tables.py; row-wise updates only). README has the rule of thumb.
  config.train.embedding_layout = "replicated"
  # sharded, "node" sampling: each device's list of the rows it asks of each owner holds the
  # most any of a few sampled batches asked of one owner, plus a margin (~S / n ids rather than
  # S); a batch that overflows one runs again with full lists (the host waits for each step to
  # know). full: always S (or L) ids, which cannot overflow. train/tables.fit_capacity.
  config.train.request_capacity = "fitted"
  config.train.num_epochs = 4.0  # Over the training edges; fractional values allowed.
  config.train.num_steps = -1  # >0 overrides num_epochs.
  config.train.num_devices = -1  # -1: all local devices.
  config.train.log_every_steps = 100
  # A trained run's workdir whose parameters start this run (the encoder: ID embeddings, input and
  # GNN layers; the hash layer too, except with trainable='hash', which trains a fresh one): its
  # best checkpoint if it kept one, else its latest.
  config.train.init_from = ""
  # all; hash: only the hash layer learns (the encoder stays as init_from left it); none: no
  # training step at all, the run only evaluates (LSH).
  config.train.trainable = "all"

  config.eval = ml_collections.ConfigDict()
  config.eval.modes = ("hamming", "hierarchical", "continuous")
  config.eval.cutoffs = (50, 100)
  # standard: known items excluded, full ranking, standard NDCG. paper: the authors' code (no
  # exclusion, hierarchical over the Hamming top `paper_candidates`, NDCG over retrieved hits).
  # The first is the record's "metrics"; all land in its "by_protocol".
  config.eval.protocols = ("standard", "paper")
  config.eval.num_candidates = 500  # M: Hamming candidates re-ranked in hierarchical search.
  # More values of M, each evaluated as a mode of its own named "hierarchical@M".
  config.eval.extra_candidates = ()
  config.eval.paper_candidates = 500
  config.eval.exclude_train = True  # standard protocol: drop known items from the ranking.
  config.eval.tie_seed = 0
  # >0: evaluate a seeded sample of this many users with held-out items (the same sample for
  # every evaluation of a run); <= 0: all of them. The record has num_eval_users / user_sample.
  config.eval.max_users = -1
  config.eval.sample_seed = 0
  # Users scored at once. Memory is O(user_chunk × items / b) for Hamming and hierarchical search
  # (b: retrieval block size, up to 64) and O(user_chunk × 2**17) for continuous search.
  config.eval.user_chunk = 256
  config.eval.edge_chunk = 65_536  # Edges aggregated at once while encoding the full graph.
  # >0: evaluate every so many steps on validation (keeping the best checkpoint by
  # `best_metric`, which then gets the final test) or, without a validation split, on test.
  config.eval.every_steps = -1
  config.eval.best_metric = "hierarchical/hr@50"  # mode/metric of the first protocol.

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1_000
  config.checkpoint.max_to_keep = 3
  return config


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Returns `config` (the paper's settings) switched to a named variant, one of VARIANTS;
  None or "" is DEFAULT_VARIANT.

  'paper' is the paper's HashGNN and 'authors_code' the authors' TF settings; the others are the
  paper's comparison set (Sec. 5.2.2) and the project's default, each a change of a few fields.
  'lsh' and 'hashgnn_sp' start from a trained 'graphsage' run: set config.train.init_from to its
  workdir (`python -m hashgnn_jax.compare` does).
  """
  if variant in (None, ""):
    variant = DEFAULT_VARIANT
  if variant == "paper":
    return config
  if variant not in VARIANTS:
    raise ValueError(f"Unknown config variant {variant!r}; expected one of {VARIANTS}.")
  if variant != "authors_code":
    return _set_fields(config, _COMPARISON_VARIANTS[variant])
  # What the authors' public TF code does where it departs from the paper.
  config.model.embed_dim = 120
  config.model.input_dense = 68
  config.model.hidden_dims = (68, 68)
  config.model.use_bias = False
  config.model.separate_hash_layers = True
  config.guidance.granularity = "node"
  config.guidance.share_positive_draw = True
  config.guidance.schedule = "linear"
  config.guidance.decrement = 0.02
  config.guidance.transition_steps = -2
  config.guidance.floor = 0.0
  config.sampler.num_negatives = 10
  config.sampler.mode = "tree"
  config.loss.cross_weight = 0.1
  config.loss.rank = "bpr"
  config.loss.rank_weight = 1.0
  config.loss.logit_scale = "none"
  config.train.num_epochs = 20.0
  return config


def _fixed_guidance(p: float) -> dict:
  return {"guidance.schedule": "constant", "guidance.init": p, "guidance.floor": p}


# The comparison set: what each variant is, and the fields it sets over HashGNN ("paper").
_COMPARISON_VARIANTS = {
  # The default: HashGNN's encoder and hash layer with the losses that measured best for its
  # binary codes (BUILD_NOTES, "Code quality"): scores ⟨z_u, z_i⟩ · 10 / K, so ±1 codes span
  # [−10, 10] rather than saturating the sigmoid at ±K; a softmax over the batch's positives
  # (logQ-corrected) beside the sampled negatives; the continuous codes throughout (p = 1).
  "hashgnn_ib": {**_fixed_guidance(1.0), "loss.logit_scale": "inv_bits",
                 "loss.temperature": 10.0, "loss.inbatch_weight": 1.0},
  # hashgnn_ib on LightGCN's propagation: no weights or non-linearity in the layers, symmetric
  # normalisation, u the mean of the layers' outputs (the hash layer as before). Its layers keep
  # the embedding's width, 64 unless a data set config changes it.
  "lightgcn_ib": {**_fixed_guidance(1.0), "loss.logit_scale": "inv_bits",
                  "loss.temperature": 10.0, "loss.inbatch_weight": 1.0,
                  "model.aggregator": "lightgcn", "model.hidden_dims": (64, 64)},
  # The continuous model alone (p = 1 throughout); its Hamming codes are sign(z).
  "graphsage": _fixed_guidance(1.0),
  # graphsage's trained codes, hashed by K seeded random hyperplanes; nothing is trained.
  "lsh": {"hash.method": "random_projection", "train.trainable": "none"},
  # Two stages: graphsage's trained encoder frozen, a fresh hash layer trained on it.
  "hashgnn_sp": {"train.trainable": "hash"},
  # The straight-through sign from the first step (p = 0).
  "hash_ste": _fixed_guidance(0.0),
  # z = tanh(β a) with β growing from 1 (HashNet's continuation); sign(z) at evaluation.
  "hashnet": {"hash.method": "continuation"},
  # Each bit a two-way Gumbel-softmax over {−1, +1}, annealed; exact ±1 codes at evaluation.
  "hash_gumb": {"hash.method": "gumbel"},
  # HashGNN without the ranking loss (λ = 0).
  "hashgnn_nr": {"loss.rank_weight": 0.0},
  # ID embeddings without the GNN: the hash layer reads the embedding; the same losses.
  "mf": {"model.encoder": "embedding"},
  # Plain BPR matrix factorisation on continuous embeddings; sign(u) for Hamming search.
  "bprmf": {"model.encoder": "embedding", "model.input_dense": 0, "hash.method": "identity",
            "loss.cross_weight": 0.0, "loss.rank": "bpr", "loss.rank_weight": 1.0},
}


def _set_fields(config: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  for key, value in fields.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def _check_choice(value, choices, key):
  if value not in choices:
    raise ValueError(f"config.{key}={value!r} is not one of {choices}.")


def _check_positive(value, key):
  if value <= 0:
    raise ValueError(f"config.{key}={value!r} must be > 0.")


def end_time_seconds(value: str, split: str) -> int | None:
  """Parses `config.data.end_time` into Unix seconds; None for "" (the log's own end).

  Raises a ValueError naming the key if the value does not parse or `split` is not temporal.
  """
  text = str(value).strip()
  if not text:
    return None
  seconds = None
  # Integers come first, so an all-digit value is always seconds, never ISO's basic '20171204'.
  if re.fullmatch(r"[+-]?\d+", text):
    seconds = int(text)
    try:
      _EPOCH + datetime.timedelta(seconds=seconds)
    except OverflowError:
      seconds = None
  else:
    try:
      moment = datetime.datetime.fromisoformat(text)
    except ValueError:
      moment = None
    if moment is not None:
      if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
      since = moment - _EPOCH
      # A fraction rounds up: timestamps are whole seconds, so `t < end` keeps the same rows.
      seconds = since.days * 86_400 + since.seconds + (since.microseconds > 0)
  if seconds is None:
    raise ValueError(
        f"config.data.end_time={value!r} is not a time (or lies outside the years 1 to "
        f"9999); expected {_END_TIME_FORMS}.")
  if split != "temporal":
    raise ValueError(
        f"config.data.end_time={value!r} ends the temporal split's window, but "
        f"config.data.split={split!r}; set split='temporal' or leave end_time ''.")
  return seconds


def check_min_rating(value) -> float:
  """Returns `config.data.min_rating` as a float, rejecting NaN and +inf (which keep nothing)."""
  value = float(value)
  if math.isnan(value) or value == math.inf:
    raise ValueError(
        f"config.data.min_rating={value} must be a finite number, or -inf to keep every row.")
  return value


def with_data_defaults(data_config) -> ml_collections.ConfigDict:
  """`data_config` (a `config.data` section, possibly partial) over the schema's defaults.

  Raises KeyError naming a key the schema does not have.
  """
  full = default_config().data
  full.lock()
  full.update(data_config)
  return full


def validate_data(data: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the key, on a bad `config.data`: the one check of that section."""
  _check_choice(data.kind, formats.KINDS, "data.kind")
  for key in ("test_fraction", "valid_fraction"):
    if not 0.0 <= data[key] < 1.0:
      raise ValueError(f"config.data.{key}={data[key]} must be in [0, 1).")
  _check_choice(data.split, formats.SPLITS, "data.split")
  if data.split == "temporal":
    _check_positive(data.train_days, "data.train_days")
    _check_positive(data.test_days, "data.test_days")
  end_time_seconds(data.end_time, data.split)
  for key in ("min_user_interactions", "min_item_interactions"):
    if data[key] < 0:
      raise ValueError(f"config.data.{key}={data[key]} must be >= 0.")
  if math.isfinite(check_min_rating(data.min_rating)):
    if data.kind == "synthetic":
      raise ValueError(
          f"config.data.min_rating={data.min_rating} filters by rating, and "
          "config.data.kind='synthetic' has no ratings; leave it at -inf.")
    if data.kind not in RATED_KINDS or (data.kind == "csv" and not data.columns.rating):
      raise ValueError(
          f"config.data.min_rating={data.min_rating} filters by rating, and {data.kind} data has "
          + ("none: set config.data.columns.rating" if data.kind == "csv" else
             "none; leave it at -inf"))
  _check_choice(data.timestamp_unit, TIMESTAMP_UNITS, "data.timestamp_unit")
  if data.timestamp_unit != "s" and data.kind != "csv":
    raise ValueError(
        f"config.data.timestamp_unit={data.timestamp_unit!r} is for the integer timestamps of "
        f"kind 'csv'; {data.kind} data has its own fixed format, so leave it at 's'")


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the key, on values the schema's types cannot rule out."""
  validate_data(config.data)
  _check_choice(config.sampler.trim_sets, TRIM_SETS, "sampler.trim_sets")
  _check_choice(config.model.aggregator, AGGREGATORS, "model.aggregator")
  width = config.model.input_dense or config.model.embed_dim
  if config.model.aggregator == "lightgcn" and any(d != width for d in config.model.hidden_dims):
    raise ValueError(
        f"config.model.hidden_dims={tuple(config.model.hidden_dims)}: lightgcn layers have no "
        f"weights, so each keeps its input's width, {width} (config.model.input_dense or else "
        f"embed_dim); expected {(width,) * len(config.model.hidden_dims)}.")
  _check_choice(config.model.init, ("normal", "glorot"), "model.init")
  _check_choice(config.model.encoder, ENCODERS, "model.encoder")
  _check_choice(config.hash.method, HASH_METHODS, "hash.method")
  _check_choice(config.train.trainable, TRAINABLE, "train.trainable")
  if config.hash.method == "identity" and (config.model.encoder != "embedding"
                                            or config.model.input_dense > 0):
    raise ValueError("config.hash.method='identity' serves the ID embedding itself as the code: "
                     "it needs config.model.encoder='embedding' and config.model.input_dense=0.")
  if config.hash.beta_delay_steps < 0:
    raise ValueError(f"config.hash.beta_delay_steps={config.hash.beta_delay_steps} must be >= 0.")
  _check_positive(config.hash.beta_doubling_steps, "hash.beta_doubling_steps")
  _check_positive(config.hash.tau_half_life_steps, "hash.tau_half_life_steps")
  if not 0.0 < config.hash.tau_min <= config.hash.tau_init:
    raise ValueError(f"config.hash.tau_min={config.hash.tau_min} must lie in (0, "
                     f"config.hash.tau_init={config.hash.tau_init}].")
  if config.train.trainable != "all" and not config.train.init_from:
    raise ValueError(
        f"config.train.trainable={config.train.trainable!r} keeps the encoder as it starts, so it "
        "needs config.train.init_from: the workdir of a trained run (e.g. the graphsage "
        "variant's).")
  for i, m in enumerate(config.eval.extra_candidates):
    _check_positive(m, f"eval.extra_candidates[{i}]")
  _check_choice(config.guidance.granularity, GRANULARITIES, "guidance.granularity")
  _check_choice(config.guidance.schedule, SCHEDULES, "guidance.schedule")
  _check_choice(config.loss.logit_scale, LOGIT_SCALES, "loss.logit_scale")
  _check_choice(config.loss.rank, RANK_LOSSES, "loss.rank")
  _check_positive(config.loss.temperature, "loss.temperature")
  _check_positive(config.loss.binary_temperature, "loss.binary_temperature")
  for key in ("binary_weight", "inbatch_weight", "quant_weight", "balance_weight",
              "decorr_weight"):
    if config.loss[key] < 0:
      raise ValueError(f"config.loss.{key}={config.loss[key]} must be >= 0.")
  if not 0 <= config.loss.inbatch_negatives <= config.sampler.num_negatives:
    raise ValueError(f"config.loss.inbatch_negatives={config.loss.inbatch_negatives}: expected "
                     f"0..config.sampler.num_negatives={config.sampler.num_negatives}.")
  if config.loss.inbatch_negatives and not config.loss.inbatch_weight:
    raise ValueError(f"config.loss.inbatch_negatives={config.loss.inbatch_negatives} needs "
                     "config.loss.inbatch_weight > 0 (the softmax they join).")
  _check_choice(config.sampler.mode, SAMPLER_MODES, "sampler.mode")
  _check_choice(config.train.embedding_update, EMBEDDING_UPDATES, "train.embedding_update")
  _check_choice(config.train.embedding_layout, EMBEDDING_LAYOUTS, "train.embedding_layout")
  _check_choice(config.train.request_capacity, REQUEST_CAPACITIES, "train.request_capacity")
  if config.train.embedding_weight_decay < 0:
    raise ValueError(f"config.train.embedding_weight_decay={config.train.embedding_weight_decay}"
                     ": expected >= 0.")
  # Settings only the row-wise update implements, each with why.
  needs_rowwise = (
      (config.train.embedding_weight_decay, "train.embedding_weight_decay",
       "the row-wise update applies it"),
      (config.train.embedding_layout == "sharded", "train.embedding_layout='sharded'",
       "dense Adam reads the whole table each step"))
  if config.sampler.mode == "full" and config.train.embedding_update != "dense":
    raise ValueError("config.sampler.mode='full' trains every embedding row each step: it needs "
                     "config.train.embedding_update='dense', not "
                     f"{config.train.embedding_update!r}.")
  for active, setting, why in needs_rowwise:
    if active and config.train.embedding_update != "rowwise":
      raise ValueError(f"config.{setting} needs config.train.embedding_update='rowwise' ({why}), "
                       f"not {config.train.embedding_update!r}.")
  _check_choice(config.train.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
  if not 0.0 <= config.train.lr_end_fraction <= 1.0:
    raise ValueError(
        f"config.train.lr_end_fraction={config.train.lr_end_fraction} must be in [0, 1].")
  if config.train.warmup_steps < 0:
    raise ValueError(f"config.train.warmup_steps={config.train.warmup_steps} must be >= 0.")
  for mode in config.eval.modes:
    _check_choice(mode, EVAL_MODES, "eval.modes")
  if not config.eval.protocols:
    raise ValueError("config.eval.protocols is empty; use ('standard',), ('paper',) or both.")
  for protocol in config.eval.protocols:
    _check_choice(protocol, PROTOCOLS, "eval.protocols")
  if len(config.model.hidden_dims) != len(config.sampler.fanouts):
    raise ValueError(
        f"config.model.hidden_dims={tuple(config.model.hidden_dims)} needs one size per layer of "
        f"config.sampler.fanouts={tuple(config.sampler.fanouts)}.")
  for i, fanout in enumerate(config.sampler.fanouts):
    _check_positive(fanout, f"sampler.fanouts[{i}]")
  for i, dim in enumerate(config.model.hidden_dims):
    _check_positive(dim, f"model.hidden_dims[{i}]")
  for key in ("sampler.num_negatives", "model.embed_dim", "model.hash_bits", "train.batch_size",
              "train.learning_rate", "eval.num_candidates", "eval.paper_candidates",
              "eval.user_chunk", "eval.edge_chunk"):
    group, field = key.split(".")
    _check_positive(config[group][field], key)
  for i, cutoff in enumerate(config.eval.cutoffs):
    _check_positive(cutoff, f"eval.cutoffs[{i}]")
  if config.eval.sample_seed < 0:
    raise ValueError(f"config.eval.sample_seed={config.eval.sample_seed} must be >= 0.")
  for m in config.eval.extra_candidates:
    if m < min(config.eval.cutoffs):
      raise ValueError(f"config.eval.extra_candidates holds {m}, below every cutoff "
                       f"{tuple(config.eval.cutoffs)}: its mode would report nothing.")
  for key in ("num_candidates", "paper_candidates"):
    if "hierarchical" in config.eval.modes and config.eval[key] < max(config.eval.cutoffs):
      raise ValueError(
          f"config.eval.{key}={config.eval[key]} must be >= the largest cutoff "
          f"{max(config.eval.cutoffs)} for hierarchical search.")
  if not 0.0 <= config.guidance.floor <= config.guidance.init <= 1.0:
    raise ValueError("config.guidance.floor <= config.guidance.init must both lie in [0, 1]; got "
                     f"{config.guidance.floor} and {config.guidance.init}.")
  if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
    raise ValueError("Set config.train.num_steps > 0 or config.train.num_epochs > 0.")
