"""`tunekit run PIPELINE.yaml`: every stage of a pipeline file, validated up front, cached by fingerprint."""
