"""Steps 7 to 10 of a record's path: the pipeline, the zone landers, the raw formats and the curated
zone (inference and Parquet).
"""
