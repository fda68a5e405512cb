"""Spark jobs: standalone spark-submit scripts that only parse arguments and call gensar_core."""
