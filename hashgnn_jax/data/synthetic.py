"""Seeded synthetic user-item interactions with planted community and popularity structure.

The graph is the built-in default data set: it needs no download, and it is shaped so that a
global popularity ranking is a real but beatable baseline, while a model that picks up the latent
communities from the graph can do much better.

Generative model (all randomness comes from one `numpy.random.Generator` seeded by `seed`):

1. Items are split into `num_communities` communities of (almost) equal size by a random
   permutation, and get a Zipf-like popularity weight `w_i = r_i ** -popularity_exponent`, where
   the ranks `r_i` in `1..num_items` are randomly permuted over the items, so that popularity is
   independent of the community and of the item id.
2. Users are split into communities the same way. Each user `u` gets an activity
   `n_u = min_items_per_user + round(X_u)`, where `X_u` follows a Lomax (shifted Pareto)
   distribution with tail index 3 and mean `mean_items_per_user - min_items_per_user`, so degrees
   are heavy-tailed with mean close to `mean_items_per_user`. `n_u` is capped at the number of
   items the user can reach: all items, or only its own community when `in_community_prob == 1`.
3. Each of the `n_u` interactions of a user in community `c` is, independently with probability
   `in_community_prob`, an in-community one (at most `|c|` of them; any surplus becomes global).
   The in-community interactions are sampled without replacement from the items of `c`, and the
   others without replacement from all items the user does not hold yet, in both cases with
   probabilities proportional to `w_i`.

So a fraction of about `in_community_prob + (1 - in_community_prob) / num_communities` of the
interactions stays inside the user's community (less when very active users exhaust their
community), while the global draws keep a popularity signal that a non-personalised ranking can
exploit.

Sampling without replacement is exact and vectorised over users, in two stages: rounds of draws
with replacement for every user still short of items, keeping only the items new to that user
(sequential sampling with repeats rejected), and, for the few users for which repeats stay frequent
(those that need most of what they can reach), Gumbel-top-k over the items they do not hold yet.
Draws are looked up in the popularity CDFs in sorted order, which keeps the Alibaba-size graph of
configs/alibaba.py:synthetic (601,946 users, 4,167,708 items, ~28.4M pairs) at about 25 s of CPU
time and 1.9 GB peak memory.
"""

import dataclasses

import numpy as np

# Lomax tail index of the user activity: heavy-tailed like real check-in and click logs, yet with
# a finite variance, so the empirical mean settles near the target even for small graphs.
_ACTIVITY_TAIL_INDEX = 3.0
# Rejection sampling is cheap while most draws are new items; users that need a large share of
# what they can reach collide often and are finished by Gumbel-top-k instead. The draw cost is
# measured in Gumbel score entries (a draw does a few binary searches and a sort).
_DRAW_COST = 4.0
_MAX_REJECTION_ROUNDS = 32
# Upper bound on the number of score entries in one Gumbel-top-k block, to bound memory.
_GUMBEL_BLOCK_ENTRIES = 1 << 22


@dataclasses.dataclass(frozen=True, eq=False)
class PlantedStructure:
  """Latent variables behind a generated graph, for tests and oracle baselines."""

  item_community: np.ndarray  # [I] int32
  item_popularity: np.ndarray  # [I] float64, Zipf weights (not normalised)
  user_community: np.ndarray  # [U] int32
  user_activity: np.ndarray  # [U] int32, number of distinct items of each user


def _validate(
  *,
  num_users: int,
  num_items: int,
  num_communities: int,
  mean_items_per_user: float,
  min_items_per_user: int,
  popularity_exponent: float,
  in_community_prob: float,
) -> None:
  """Raises ValueError naming the first invalid generator argument."""
  if num_users < 1:
    raise ValueError(f"num_users must be >= 1, got {num_users}")
  if num_items < 1:
    raise ValueError(f"num_items must be >= 1, got {num_items}")
  if not 1 <= num_communities <= num_items:
    raise ValueError(
      f"num_communities must be in [1, num_items={num_items}], got {num_communities}"
    )
  if not 1 <= min_items_per_user <= num_items:
    raise ValueError(
      f"min_items_per_user must be in [1, num_items={num_items}], got {min_items_per_user}"
    )
  if not min_items_per_user <= mean_items_per_user <= num_items:
    raise ValueError(
      f"mean_items_per_user must be in [min_items_per_user={min_items_per_user}, "
      f"num_items={num_items}], got {mean_items_per_user}"
    )
  if not popularity_exponent >= 0:
    raise ValueError(f"popularity_exponent must be >= 0, got {popularity_exponent}")
  if not 0 <= in_community_prob <= 1:
    raise ValueError(f"in_community_prob must be in [0, 1], got {in_community_prob}")


def _balanced_assignment(rng: np.random.Generator, *, size: int, num_groups: int) -> np.ndarray:
  """Assigns `size` elements to `num_groups` groups whose sizes differ by at most one."""
  return rng.permutation(np.arange(size) % num_groups).astype(np.int32)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
  """Returns the sorted distinct values of an integer array."""
  # Sort-and-compare, because np.unique's hash path is far slower on millions of int64 keys.
  keys = np.sort(keys)
  return keys[np.concatenate([[True], keys[1:] != keys[:-1]])]


def _is_in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
  """Returns a bool mask [N] telling which of `keys` [N] occur in the sorted `sorted_keys`."""
  if sorted_keys.size == 0:
    return np.zeros(keys.shape, dtype=bool)
  pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
  return sorted_keys[pos] == keys


def _search_cdf(cdf: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Returns `np.searchsorted(cdf, targets, side="right")` [N] for a CDF [I] and targets [N]."""
  # Random targets make every binary search miss the cache once the CDF outgrows it (Alibaba
  # size: ~2 us a draw); searching them in sorted order walks the CDF once and is ~5x faster
  # even counting the argsort, and scattering back keeps the draws in the seeded order.
  order = np.argsort(targets)  # [N]
  pos = np.empty(targets.shape, dtype=np.int64)  # [N]
  pos[order] = np.searchsorted(cdf, targets[order], side="right")
  return pos


class _PopularitySampler:
  """Samples items proportionally to popularity, within one community or from all items."""

  def __init__(
    self, *, item_community: np.ndarray, item_popularity: np.ndarray, num_communities: int
  ):
    self._item_community = item_community  # [I]
    self._log_popularity = np.log(item_popularity)  # [I]
    self._global_cdf = np.cumsum(item_popularity)  # [I]
    # Items sorted by community, so that each community is a contiguous segment of one CDF and a
    # draw inside a community is a single searchsorted into its segment.
    self._by_community = np.argsort(item_community, kind="stable")  # [I]
    self._seg_size = np.bincount(item_community, minlength=num_communities)  # [C]
    self._seg_start = np.cumsum(self._seg_size) - self._seg_size  # [C]
    self._slot = np.empty_like(self._by_community)  # [I] position of an item in its segment
    self._slot[self._by_community] = np.arange(item_community.shape[0]) - np.repeat(
      self._seg_start, self._seg_size
    )
    sorted_popularity = item_popularity[self._by_community]  # [I]
    self._community_cdf = np.cumsum(sorted_popularity)  # [I]
    self._seg_base = self._community_cdf[self._seg_start] - sorted_popularity[self._seg_start]
    self._seg_mass = np.add.reduceat(sorted_popularity, self._seg_start)  # [C]

  def support_size(self, *, in_community: bool) -> int:
    """Returns the number of candidate items one user is scored against by Gumbel-top-k."""
    return int(self._seg_size.max()) if in_community else self._item_community.shape[0]

  def draw(
    self, rng: np.random.Generator, *, communities: np.ndarray, in_community: bool
  ) -> np.ndarray:
    """Draws one item [N] per entry of `communities` [N], with replacement."""
    u = rng.random(communities.shape[0])  # [N]
    if not in_community:
      pos = _search_cdf(self._global_cdf, u * self._global_cdf[-1])
      # Rounding in the cumulative sum can push a draw one slot past the end.
      return np.minimum(pos, self._global_cdf.shape[0] - 1)
    target = self._seg_base[communities] + u * self._seg_mass[communities]
    pos = _search_cdf(self._community_cdf, target)
    seg_end = self._seg_start[communities] + self._seg_size[communities]
    return self._by_community[np.clip(pos, self._seg_start[communities], seg_end - 1)]

  def candidates(
    self, *, communities: np.ndarray, in_community: bool
  ) -> tuple[np.ndarray, np.ndarray]:
    """Returns candidate items [N, M] and their log weights [N, M] (padding has -inf)."""
    n = communities.shape[0]
    num_items = self._item_community.shape[0]
    if not in_community:
      items = np.broadcast_to(np.arange(num_items), (n, num_items))
      return items, np.tile(self._log_popularity, (n, 1))
    slots = np.arange(self.support_size(in_community=True))  # [M]
    valid = slots[None, :] < self._seg_size[communities][:, None]  # [N, M]
    pos = self._seg_start[communities][:, None] + np.where(valid, slots[None, :], 0)
    items = self._by_community[pos]  # [N, M]
    return items, np.where(valid, self._log_popularity[items], -np.inf)

  def columns(
    self, items: np.ndarray, *, communities: np.ndarray, in_community: bool
  ) -> tuple[np.ndarray, np.ndarray]:
    """Returns where `items` [H] sit among the candidates of `communities` [H], and if at all."""
    if not in_community:
      return items, np.ones(items.shape, dtype=bool)
    return self._slot[items], self._item_community[items] == communities


def _fill(
  rng: np.random.Generator,
  sampler: _PopularitySampler,
  *,
  held: np.ndarray,
  need: np.ndarray,
  user_community: np.ndarray,
  num_items: int,
  in_community: bool,
) -> np.ndarray:
  """Adds `need` [U] new items per user to the sorted keys `held`; returns the merged keys."""
  need = need.astype(np.int64)  # [U]
  support = sampler.support_size(in_community=in_community)
  rejecting = need > 0  # [U] users still sampled by rejection
  for _ in range(_MAX_REJECTION_ROUNDS):
    short = np.flatnonzero(rejecting)
    if short.size == 0:
      break
    # Drawing exactly the shortfall means a round never overshoots, so all distinct new items of
    # a round can be kept without tracking the order of the draws.
    drawn = need[short]
    draw_users = np.repeat(short, drawn)
    draws = sampler.draw(rng, communities=user_community[draw_users], in_community=in_community)
    keys = _sorted_unique(draw_users * num_items + draws)
    new = keys[~_is_in_sorted(keys, held)]
    # Both parts are sorted, so the stable (merge-based) sort runs in linear time here.
    held = np.sort(np.concatenate([held, new]), kind="stable")
    gained = np.bincount(new // num_items, minlength=need.shape[0])[short]
    need[short] -= gained
    # Hand a user to Gumbel-top-k once the draws it still needs, at this round's acceptance
    # rate, would cost more than scoring every candidate item once.
    expected_draws = need[short] * (drawn + 1) / (gained + 1)
    rejecting[short] = (need[short] > 0) & (expected_draws * _DRAW_COST < support)

  short = np.flatnonzero(need)
  rows_per_block = max(1, _GUMBEL_BLOCK_ENTRIES // support)
  extra = []
  for start in range(0, short.size, rows_per_block):
    block = short[start : start + rows_per_block]  # [R]
    communities = user_community[block]  # [R]
    items, scores = sampler.candidates(communities=communities, in_community=in_community)
    # Excluding the held items makes the top-k continue the sequential sample exactly.
    lo = np.searchsorted(held, block * num_items)  # [R]
    counts = np.searchsorted(held, (block + 1) * num_items) - lo  # [R]
    rows = np.repeat(np.arange(block.size), counts)  # [H]
    offsets = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)  # [H]
    cols, among = sampler.columns(
      held[lo[rows] + offsets] % num_items, communities=communities[rows], in_community=in_community
    )
    scores[rows[among], cols[among]] = -np.inf
    scores += rng.gumbel(size=scores.shape)  # [R, M]
    block_need = need[block]  # [R]
    k = int(block_need.max())
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [R, k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1)), axis=1)
    keep = np.arange(k)[None, :] < block_need[:, None]  # [R, k]
    owners = np.broadcast_to(block[:, None], keep.shape)[keep]
    extra.append(owners * num_items + np.take_along_axis(items, top, axis=1)[keep])
  return np.sort(np.concatenate([held, *extra]))


def generate_interactions(
  *,
  num_users: int,
  num_items: int,
  num_communities: int,
  mean_items_per_user: float,
  min_items_per_user: int,
  popularity_exponent: float,
  in_community_prob: float,
  seed: int,
  return_structure: bool = False,
) -> tuple[np.ndarray, ...]:
  """Returns sorted unique (users, items) int32 [E] pairs, plus the PlantedStructure if asked."""
  _validate(
    num_users=num_users,
    num_items=num_items,
    num_communities=num_communities,
    mean_items_per_user=mean_items_per_user,
    min_items_per_user=min_items_per_user,
    popularity_exponent=popularity_exponent,
    in_community_prob=in_community_prob,
  )
  rng = np.random.default_rng(seed)

  item_community = _balanced_assignment(rng, size=num_items, num_groups=num_communities)
  ranks = rng.permutation(num_items) + 1.0  # [I]
  item_popularity = ranks**-popularity_exponent  # [I]
  user_community = _balanced_assignment(rng, size=num_users, num_groups=num_communities)
  community_size = np.bincount(item_community, minlength=num_communities)[user_community]  # [U]

  excess_mean = mean_items_per_user - min_items_per_user
  # numpy's pareto() is the Lomax law with unit scale, whose mean is 1 / (tail - 1).
  excess = rng.pareto(_ACTIVITY_TAIL_INDEX, size=num_users) * (_ACTIVITY_TAIL_INDEX - 1.0)
  activity = min_items_per_user + np.rint(excess * excess_mean)  # [U]
  reachable = community_size if in_community_prob == 1.0 else num_items
  activity = np.minimum(activity, reachable).astype(np.int32)  # [U]
  num_inside = np.minimum(rng.binomial(activity, in_community_prob), community_size)  # [U]

  sampler = _PopularitySampler(
    item_community=item_community,
    item_popularity=item_popularity,
    num_communities=num_communities,
  )
  keys = np.empty(0, dtype=np.int64)  # sorted user * num_items + item
  for need, in_community in ((num_inside, True), (activity - num_inside, False)):
    keys = _fill(
      rng,
      sampler,
      held=keys,
      need=need,
      user_community=user_community,
      num_items=num_items,
      in_community=in_community,
    )

  users = (keys // num_items).astype(np.int32)  # [E]
  items = (keys % num_items).astype(np.int32)  # [E]
  if not return_structure:
    return users, items
  structure = PlantedStructure(
    item_community=item_community,
    item_popularity=item_popularity,
    user_community=user_community,
    user_activity=activity,
  )
  return users, items, structure
