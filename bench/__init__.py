"""``make bench``: each stage of the loop timed next to a baseline measured in the same run.

Every row pairs a gsrl figure with the plain thing it is built on (a memory copy, raw redis-py, the policy's
forward in-process, a bare gymnasium env, one plain broadcast, one env process), timed in the same run and, where
the two can alternate, interleaved, so a busy machine slows both. docs/benchmarks.md says what each row compares.
"""
