"""MovieLens-100K (``u.data``, ``u.item``, ``u.user``) to the Parquet data contract.

Every rating is an interaction (Microsoft Recommenders' protocol counts each one as
relevant), carried as ``weight`` (the rating, 1..5) unless ``weight="none"``, with its
unix time as ``ts``. MovieLens has no risk levels, activity flags, tolerances or
consent, so those columns are left out and the rules they drive are off.

The data's licence forbids redistribution: import it into a scratch folder, never
into the repository.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsvc.errors import DataError

__all__ = ["GENRES", "WEIGHTS", "import_movielens", "read_movielens"]

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
"""u.item's 19 genre flags, in column order (u.genre, when present, is read instead)."""

WEIGHTS = ("rating", "none")


def _read(path: Path, names: list[str], types: dict[str, pa.DataType], delimiter: str) -> pa.Table:
    if not path.is_file():
        raise DataError(f"movielens {path}: no such file")
    # u.item and u.user are Latin-1; pyarrow reads UTF-8.
    text = path.read_bytes().decode("latin-1").encode("utf-8")
    try:
        return pacsv.read_csv(
            io.BytesIO(text),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"movielens {path}: {exc}") from exc


def _genres(folder: Path) -> tuple[str, ...]:
    path = folder / "u.genre"
    if not path.is_file():
        return GENRES
    names = [
        line.split("|")[0]
        for line in path.read_bytes().decode("latin-1").splitlines()
        if line.strip()
    ]
    if len(names) != len(GENRES):
        raise DataError(f"movielens {path}: expected {len(GENRES)} genres, found {len(names)}")
    return tuple(names)


def read_movielens(folder: Path, weight: str = "rating") -> dict[str, pa.Table]:
    """The three tables of a MovieLens-100K folder, in the data contract's shape.

    Raises:
        DataError: a file is missing or malformed (the message names it).
    """
    if weight not in WEIGHTS:
        raise DataError(f"weight must be one of {', '.join(WEIGHTS)}, not {weight!r}")
    ratings = _read(
        folder / "u.data",
        ["user_id", "item_id", "rating", "ts"],
        {"user_id": pa.string(), "item_id": pa.string(), "rating": pa.int8(), "ts": pa.int64()},
        "\t",
    )
    if pc.min(ratings.column("rating")).as_py() < 1 or pc.max(ratings.column("rating")).as_py() > 5:
        raise DataError(f"movielens {folder / 'u.data'}: column 'rating' holds values outside 1..5")
    interactions = {
        "user_id": ratings.column("user_id"),
        "item_id": ratings.column("item_id"),
        "ts": ratings.column("ts").cast(pa.timestamp("s", tz="UTC")),
    }
    if weight == "rating":
        interactions["weight"] = ratings.column("rating").cast(pa.float32())
    genres = _genres(folder)
    item_names = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *genres]
    raw_items = _read(
        folder / "u.item",
        item_names,
        {"item_id": pa.string(), **{g: pa.int8() for g in genres}},
        "|",
    )
    flags = [raw_items.column(g).fill_null(0).to_pylist() for g in genres]
    item_genres = [
        [g for g, col in zip(genres, flags, strict=True) if col[i]]
        for i in range(raw_items.num_rows)
    ]
    items = pa.table(
        {
            "item_id": raw_items.column("item_id"),
            "title": raw_items.column("title").cast(pa.string()),
            "release_date": raw_items.column("release_date").cast(pa.string()),
            "imdb_url": raw_items.column("imdb_url").cast(pa.string()),
            "genres": pa.array(item_genres, type=pa.list_(pa.string())),
        }
    )
    users = _read(
        folder / "u.user",
        ["user_id", "age", "gender", "occupation", "zip_code"],
        {"user_id": pa.string(), "age": pa.int16(), "zip_code": pa.string()},
        "|",
    )
    return {"interactions": pa.table(interactions), "items": items, "users": users}


def import_movielens(folder: Path, out: Path, weight: str = "rating") -> dict[str, int]:
    """Write ``interactions.parquet``, ``items.parquet``, ``users.parquet`` under ``out``.

    Returns:
        Rows written per table.
    """
    tables = read_movielens(folder, weight)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, out / f"{name}.parquet")
    return {name: table.num_rows for name, table in tables.items()}
