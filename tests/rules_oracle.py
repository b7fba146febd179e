"""An independent statement of the rules, from the raw Parquet inputs, for tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import strategies as st

from recsvc.model.queries import TargetQuery
from recsvc.model.targeting import Audience, Targeter
from recsvc.settings import EXCLUSIVE_CATEGORIES
from training.data import load_training_data


class Oracle:
    """Rules recomputed from the sample's Parquet files, sharing no code with recsvc.model.rules.

    ``exclusive`` are the deployment's exclusive categories (the server's default).
    """

    def __init__(self, sample_dir: Path, exclusive: Collection[str] = EXCLUSIVE_CATEGORIES) -> None:
        items = pq.read_table(sample_dir / "items.parquet").to_pylist()
        users = pq.read_table(sample_dir / "users.parquet").to_pylist()
        self.risk = {
            r["item_id"]: (5 if r["risk_level"] is None else r["risk_level"]) for r in items
        }
        self.active = {r["item_id"]: bool(r["active"]) for r in items}
        # None: no category, which never counts against a cap or an exclusive category.
        self.category = {r["item_id"]: r.get("category") or None for r in items}
        self.exclusive = frozenset(exclusive)
        self.tolerance = {
            r["user_id"]: (1 if r["risk_tolerance"] is None else r["risk_tolerance"]) for r in users
        }
        self.consent = {r["user_id"]: r["marketing_consent"] is True for r in users}
        data = load_training_data(sample_dir / "interactions.parquet")
        m = data.user_items.tocsr()
        self.history: dict[str, set[str]] = {}
        self.held: dict[str, set[str]] = {}
        for u, uid in enumerate(data.users.ids):
            cols = m.indices[m.indptr[u] : m.indptr[u + 1]]
            held = data.held[m.indptr[u] : m.indptr[u + 1]]
            self.history[uid] = {data.items.ids[c] for c in cols}
            self.held[uid] = {data.items.ids[c] for c, h in zip(cols, held, strict=True) if h}

    def tol(self, user_id: str) -> int:
        return self.tolerance.get(user_id, 1)

    def closed_categories(self, user_id: str) -> set[str]:
        """The exclusive categories the customer holds a product of (live changes apply to held)."""
        held = {self.category[i] for i in self.held.get(user_id, ())}
        return {c for c in held if c in self.exclusive}

    def allowed(self, user_id: str, item_id: str, exclude: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
        return (
            self.active[item_id]
            and self.risk[item_id] <= self.tol(user_id)
            and item_id not in self.history.get(user_id, set())
            and item_id not in exclude
            and self.category[item_id] not in self.closed_categories(user_id)
        )

    def n_allowed(self, user_id: str, exclude: set[str] = frozenset(), cap: int = 0) -> int:  # type: ignore[assignment]
        """How many items may be shown, at most ``cap`` of one category (0: no cap)."""
        ids = [i for i in self.risk if self.allowed(user_id, i, exclude)]
        if not cap:
            return len(ids)
        per = Counter(self.category[i] for i in ids if self.category[i] is not None)
        return sum(min(cap, n) for n in per.values()) + sum(self.category[i] is None for i in ids)

    def check_recommended(
        self,
        user_id: str,
        k: int,
        exclude: set[str],
        ids: list[str],
        scores: list[float],
        cap: int = 0,
    ) -> None:
        """Every rule holds, and k items come back whenever k are allowed, best first."""
        assert all(self.allowed(user_id, i, exclude) for i in ids), user_id
        if cap:
            per = Counter(self.category[i] for i in ids if self.category[i] is not None)
            assert max(per.values(), default=0) <= cap, (user_id, per)
        n = self.n_allowed(user_id, exclude, cap)
        assert len(ids) == min(k, n) == len(set(ids)), user_id
        assert scores == sorted(scores, reverse=True), user_id

    def walk_capped(self, ranking: list[str], cap: int, k: int) -> list[str]:
        """The first k of ``ranking``, skipping each item whose category already has ``cap``."""
        counts: Counter[str] = Counter()
        out: list[str] = []
        for i in ranking:
            c = self.category[i]
            if c is not None and counts[c] >= cap:
                continue
            if c is not None:
                counts[c] += 1
            out.append(i)
            if len(out) == k:
                break
        return out

    def audience_eligible(self, items: list[str], include_holders: bool) -> set[str]:
        risk = max(self.risk[i] for i in items)
        return {
            u
            for u in self.consent
            if self.consent[u]
            and self.tol(u) >= risk
            and (include_holders or not (self.held.get(u, set()) & set(items)))
        }

    def check_audience(
        self, items: list[str], size: int, include: bool, users: list[str], scores: list[float]
    ) -> None:
        """Consent, suitability and holders hold; exactly ``size`` when enough are eligible."""
        eligible = self.audience_eligible(items, include)
        assert set(users) <= eligible
        assert len(users) == min(size, len(eligible)) == len(set(users))
        assert scores == sorted(scores, reverse=True)

    def check_audience_counts(
        self, items: list[str], include: bool, audience: Audience, erased: int = 0
    ) -> None:
        """The customers each rule left out, each under the first rule that did, and the
        eligible count (``erased``: forgotten bundle customers, counted as without consent)."""
        risk = max(self.risk[i] for i in items)
        consenting = [u for u, c in self.consent.items() if c]
        suitable = [u for u in consenting if self.tol(u) >= risk]
        holders = (
            0 if include else sum(bool(self.held.get(u, set()) & set(items)) for u in suitable)
        )
        got = audience.excluded
        assert (got.no_consent, got.unsuitable, got.holders, got.below_min_score) == (
            len(self.consent) - len(consenting) + erased,
            len(consenting) - len(suitable),
            holders,
            0,
        ), items
        assert audience.eligible == len(self.audience_eligible(items, include)), items

    def check_drawn_campaign(self, targeter: Targeter, data: st.DataObject) -> Audience:
        """Draw a campaign (1-3 active products, a size, holders or not), target, check."""
        active = [i for i in targeter.bundle.items.ids if self.active[i]]
        items = data.draw(st.lists(st.sampled_from(active), min_size=1, max_size=3, unique=True))
        size = data.draw(st.integers(1, 2000))
        include = data.draw(st.booleans())
        query = TargetQuery(item_ids=tuple(items), audience_size=size, include_holders=include)
        audience = targeter.target(query)
        users = [targeter.bundle.users.ids[r] for r in audience.rows]
        self.check_audience(items, size, include, users, audience.scores.tolist())
        self.check_audience_counts(items, include, audience)
        return audience
