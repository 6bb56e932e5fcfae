"""Data: sample records, shard conversion, the shapes world, chat template, transforms, streaming and batching.

Modules stay import-light (no torch in ``records``, ``shards``, ``convert``, ``shapes``) so that the conversion
scripts and their worker processes start fast; import what you need from the submodules.
"""
