"""A synthetic retail bank: product catalogue, customers and a year of events.

Events are drawn from latent tastes (topics that mix product categories), so
collaborative filtering has real signal, and customers buy mostly within their
risk tolerance. Written in chunks of customers, so 1M x 100K fits in memory.
Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

__all__ = ["CATEGORIES", "SampleSpec", "write_sample"]

# (category, id prefix, product name stem, lowest risk, highest risk, catalogue share)
CATEGORIES: tuple[tuple[str, str, str, int, int, float], ...] = (
    ("current_account", "CUR", "Current Account", 1, 1, 0.05),
    ("savings_account", "SAV", "Savings Account", 1, 1, 0.07),
    ("term_deposit", "TD", "Fixed Term Deposit", 1, 1, 0.06),
    ("credit_card", "CC", "Credit Card", 2, 2, 0.10),
    ("personal_loan", "PL", "Personal Loan", 3, 3, 0.07),
    ("car_loan", "CAR", "Car Loan", 3, 3, 0.04),
    ("mortgage", "MTG", "Mortgage", 3, 3, 0.06),
    ("home_insurance", "HINS", "Home Insurance", 1, 2, 0.05),
    ("life_insurance", "LINS", "Life Insurance", 1, 2, 0.05),
    ("travel_insurance", "TINS", "Travel Insurance", 1, 1, 0.03),
    ("bond_fund", "BF", "Bond Fund", 2, 3, 0.08),
    ("mutual_fund", "MF", "Mutual Fund", 3, 4, 0.12),
    ("etf", "ETF", "Equity ETF", 3, 5, 0.12),
    ("pension", "PEN", "Pension Plan", 2, 4, 0.07),
    ("crypto_note", "CRY", "Digital Asset Note", 5, 5, 0.03),
)
_FLAVOURS = ("Classic", "Plus", "Premium", "Green", "Flex", "Youth", "Gold", "Smart", "Family")
_AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
_SEGMENTS = ("student", "mass", "affluent", "private", "small_business")
_SEGMENT_P = (0.12, 0.55, 0.2, 0.05, 0.08)
_SEGMENT_RISK = (1.8, 2.2, 3.0, 3.6, 2.8)
_AGE_RISK = (0.4, 0.5, 0.3, 0.0, -0.4, -0.9)
_YEAR_START = datetime(2025, 11, 1, tzinfo=timezone.utc)
_YEAR_SECONDS = 365 * 86400


@dataclass(frozen=True)
class SampleSpec:
    """Size and shape of the synthetic bank.

    Example:
        >>> SampleSpec(users=1_000_000, items=100_000, seed=7)
    """

    users: int = 10_000
    items: int = 400
    seed: int = 42
    topics: int = 24
    mean_products: float = 8.0
    """Mean number of distinct products a customer interacts with in the year."""
    chunk_users: int = 100_000


def _catalogue(spec: SampleSpec, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    shares = np.array([c[5] for c in CATEGORIES])
    counts = np.maximum(1, np.floor(shares / shares.sum() * spec.items)).astype(int)
    counts[np.argmax(counts)] += spec.items - counts.sum()
    cat = np.repeat(np.arange(len(CATEGORIES)), counts)[: spec.items]
    ids, names, risk = [], [], np.empty(spec.items, dtype=np.int64)
    seq = np.zeros(len(CATEGORIES), dtype=int)
    for row, c in enumerate(cat):
        _, prefix, stem, lo, hi, _ = CATEGORIES[c]
        seq[c] += 1
        ids.append(f"{prefix}-{seq[c]:06d}")
        names.append(f"{_FLAVOURS[seq[c] % len(_FLAVOURS)]} {stem} {seq[c]}")
        risk[row] = rng.integers(lo, hi + 1)
    risk_null = rng.random(spec.items) < 0.02
    active = rng.random(spec.items) >= 0.05
    fee = np.round(rng.gamma(2.0, 30.0, spec.items), 2)
    table = pa.table(
        {
            "item_id": pa.array(ids, pa.string()),
            "name": pa.array(names, pa.string()),
            "category": pa.array([CATEGORIES[c][0] for c in cat], pa.string()),
            "risk_level": pa.array(risk, pa.int8(), mask=risk_null),
            "active": pa.array(active, pa.bool_()),
            "annual_fee": pa.array(fee, pa.float64()),
        }
    )
    return table, cat


def _topics(spec: SampleSpec, cat: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Each topic mixes a few categories; items join a topic by their category."""
    pref = rng.dirichlet(np.full(len(CATEGORIES), 0.3), size=spec.topics)  # topic x category
    p = pref[:, cat]  # topic x item
    # Gumbel-max: one categorical draw per item, vectorized.
    topic_of_item = np.argmax(np.log(p) + rng.gumbel(size=p.shape), axis=0)
    members = []
    for t in range(spec.topics):
        rows = np.flatnonzero(topic_of_item == t)
        if rows.size == 0:
            rows = rng.choice(spec.items, size=1)
        members.append(rng.permutation(rows))  # position = popularity rank
    return members


def _users(spec: SampleSpec, start: int, n: int, rng: np.random.Generator) -> pa.Table:
    age = rng.integers(0, len(_AGE_BANDS), n)
    seg = rng.choice(len(_SEGMENTS), size=n, p=_SEGMENT_P)
    appetite = np.array(_SEGMENT_RISK)[seg] + np.array(_AGE_RISK)[age] + rng.normal(0, 0.8, n)
    tolerance = np.clip(np.rint(appetite), 1, 5).astype(np.int8)
    consent_draw = rng.random(n)
    return pa.table(
        {
            "user_id": pa.array([f"C{start + i:08d}" for i in range(n)], pa.string()),
            "risk_tolerance": pa.array(tolerance, pa.int8(), mask=rng.random(n) < 0.03),
            "marketing_consent": pa.array(consent_draw < 0.7, pa.bool_(), mask=consent_draw > 0.95),
            "age_band": pa.array([_AGE_BANDS[a] for a in age], pa.string()),
            "segment": pa.array([_SEGMENTS[s] for s in seg], pa.string()),
        }
    )


def _events(
    spec: SampleSpec,
    users: pa.Table,
    start: int,
    members: list[np.ndarray],
    item_risk: np.ndarray,
    item_ids: pa.Array,
    rng: np.random.Generator,
) -> pa.Table:
    n = users.num_rows
    tol = users.column("risk_tolerance").fill_null(1).to_numpy().astype(np.int64)
    taste = rng.dirichlet(np.full(spec.topics, 0.15), size=n)
    n_pairs = rng.geometric(1.0 / spec.mean_products, n)
    user = np.repeat(np.arange(n), n_pairs)
    cum = np.cumsum(taste, axis=1)[user]
    topic = np.minimum((cum < rng.random((len(user), 1))).sum(axis=1), spec.topics - 1)
    # Zipf-like popularity within a topic: rank r drawn with p ~ 1/(r+1).
    lengths = np.array([len(m) for m in members])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sizes = lengths[topic]
    rank = np.minimum(np.floor(np.expm1(rng.random(len(user)) * np.log1p(sizes))), sizes - 1)
    item = np.concatenate(members)[offsets[topic] + rank.astype(np.int64)]
    # Customers mostly stay within their risk appetite.
    over = item_risk[item] > tol[user]
    keep = ~over | (rng.random(len(user)) < 0.1)
    user, item, over = user[keep], item[keep], over[keep]
    pair = np.unique(user * len(item_ids) + item)
    user, item = pair // len(item_ids), pair % len(item_ids)
    over = item_risk[item] > tol[user]
    m = len(user)
    click = rng.random(m) < 0.55
    apply = click & (rng.random(m) < 0.35)
    buy = apply & (rng.random(m) < np.where(over, 0.15, 0.6))
    t0 = rng.integers(0, _YEAR_SECONDS - 7 * 86400, m)
    steps = [("view", np.ones(m, bool)), ("click", click), ("apply", apply), ("purchase", buy)]
    parts_u, parts_i, parts_e, parts_t = [], [], [], []
    for k, (_, mask) in enumerate(steps):
        parts_u.append(user[mask])
        parts_i.append(item[mask])
        parts_e.append(np.full(int(mask.sum()), k, dtype=np.int8))
        parts_t.append(t0[mask] + k * rng.integers(60, 2 * 86400, int(mask.sum())))
    u, i = np.concatenate(parts_u), np.concatenate(parts_i)
    ts = np.concatenate(parts_t) + int(_YEAR_START.timestamp())
    order = np.lexsort((ts, u))
    names = pa.array([s[0] for s in steps], pa.string())
    return pa.table(
        {
            "user_id": users.column("user_id").take(pa.array(u[order])),
            "item_id": item_ids.take(pa.array(i[order])),
            "event": pa.DictionaryArray.from_arrays(
                pa.array(np.concatenate(parts_e)[order]), names
            ).cast(pa.string()),
            "ts": pa.array(ts[order], pa.timestamp("s", tz="UTC")),
        }
    )


def write_sample(
    out: Path, spec: SampleSpec | None = None, progress: bool = True
) -> dict[str, int]:
    """Write interactions/items/users Parquet into ``out``; returns row counts."""
    spec = spec or SampleSpec()
    if spec.users < 1 or spec.items < len(CATEGORIES):
        raise ValueError(f"need at least 1 user and {len(CATEGORIES)} items")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    items, cat = _catalogue(spec, rng)
    members = _topics(spec, cat, rng)
    item_risk = items.column("risk_level").fill_null(5).to_numpy().astype(np.int64)
    item_ids = items.column("item_id").combine_chunks()
    pq.write_table(items, out / "items.parquet")
    counts = {"items": spec.items, "users": 0, "interactions": 0}
    user_writer: pq.ParquetWriter | None = None
    event_writer: pq.ParquetWriter | None = None
    try:
        for start in tqdm(
            range(0, spec.users, spec.chunk_users),
            desc="sample",
            unit="chunk",
            disable=not progress,
        ):
            n = min(spec.chunk_users, spec.users - start)
            chunk_rng = np.random.default_rng([spec.seed, start])
            users = _users(spec, start, n, chunk_rng)
            events = _events(spec, users, start, members, item_risk, item_ids, chunk_rng)
            user_writer = user_writer or pq.ParquetWriter(out / "users.parquet", users.schema)
            event_writer = event_writer or pq.ParquetWriter(
                out / "interactions.parquet", events.schema
            )
            user_writer.write_table(users)
            event_writer.write_table(events)
            counts["users"] += n
            counts["interactions"] += events.num_rows
    finally:
        for writer in (user_writer, event_writer):
            if writer is not None:
                writer.close()
    return counts
