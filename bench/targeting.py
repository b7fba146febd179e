"""Targeting: audience time for one product, server-side (``Targeter.target``).

Runs in its own process over a bundle, for a few active products of different
risk levels: a 10,000-customer audience as served (exact blocked matrix products
below ``recsvc.model.targeting.EXACT_MAX_BASE`` eligible customers, the user index
above), the same through the user index (rules inside the search) with its
overlap with the exact audience, and the full ranked audience over every eligible
customer.

``python -m bench.targeting --models DIR`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "measure"]

_EACH_PRODUCTS = 256


def measure(models: Path, size: int, products: int, full_products: int) -> dict[str, Any]:
    import faiss

    from bench.bundles import latest_bundle
    from recsvc.model.bundle import load_bundle
    from recsvc.model.queries import MAX_AUDIENCE, TargetQuery
    from recsvc.model.targeting import Targeter

    folder = latest_bundle(models)
    faiss.omp_set_num_threads(1)  # as the server runs it
    t0 = time.perf_counter()
    bundle = load_bundle(folder)
    load_s = time.perf_counter() - t0
    targeter = Targeter(bundle)
    indexed = Targeter(bundle, exact_max_base=0)  # the user index for small audiences
    # Products of every risk level the catalogue has, most popular first within each.
    active = np.flatnonzero(targeter.item_active)
    popularity = np.bincount(bundle.indices, minlength=len(bundle.items))
    picks: list[int] = []
    for level in np.unique(targeter.item_risk[active]):
        rows = active[targeter.item_risk[active] == level]
        picks.append(int(rows[np.argmax(popularity[rows])]))
    picks = picks[:products]
    ids = [bundle.items.ids[r] for r in picks]

    def timed(item_id: str, n: int, by: Targeter = targeter) -> tuple[float, Any]:
        start = time.perf_counter()
        audience = by.target(TargetQuery(item_ids=(item_id,), audience_size=n))
        return time.perf_counter() - start, audience

    timed(ids[0], size)  # first calls: page in the vectors and the index
    timed(ids[0], size, indexed)
    small, small_index, overlap = [], [], []
    served_indexed = False
    for item_id in ids:
        seconds, audience = timed(item_id, size)
        small.append(seconds)
        served_indexed |= audience.indexed
        seconds, approx = timed(item_id, size, indexed)
        small_index.append(seconds)
        _, full = timed(item_id, MAX_AUDIENCE)
        exact = set(full.rows[: len(approx.rows)].tolist())
        overlap.append(len(exact & set(approx.rows.tolist())) / max(1, len(approx.rows)))
    whole = [timed(item_id, MAX_AUDIENCE) for item_id in ids[:full_products]]
    # Every product's audience (recsvc-train audience --all-items), the first few blocks.
    start = time.perf_counter()
    each = sum(1 for _ in itertools.islice(targeter.target_each(1000), _EACH_PRODUCTS))
    each_s = time.perf_counter() - start
    one = [timed(item_id, 1000)[0] for item_id in ids]
    return {
        "version": folder.name,
        "users": len(bundle.users),
        "items": len(bundle.items),
        "user_index": bundle.manifest.indexes.users.kind,
        "load_s": round(load_s, 2),
        "size": size,
        "products": ids,
        "small_s": [round(s, 4) for s in small],
        "small_path": "user index" if served_indexed else "exact",
        "small_index_s": [round(s, 4) for s in small_index],
        "small_overlap": [round(o, 4) for o in overlap],
        "full_s": [round(s, 3) for s, _ in whole],
        "full_rows": [len(a.rows) for _, a in whole],
        "each_products": each,
        "each_ms": round(each_s / max(1, each) * 1000, 2),
        "one_ms": round(float(np.mean(one)) * 1000, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.targeting", description=__doc__)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--size", type=int, default=10_000)
    p.add_argument("--products", type=int, default=3)
    p.add_argument("--full-products", type=int, default=2)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.models, args.size, args.products, args.full_products)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
