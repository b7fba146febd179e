"""recsvc's offline trainer: Parquet in, a versioned, checksummed model bundle out."""
