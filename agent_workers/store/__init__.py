"""The versioned parameter store: blobs, versions, the compare-and-set commit, locks and maintenance.

``params.RedisParamStore`` is the store; ``blobs`` encodes a version's tensors, ``versions`` names its head and commit
outcomes, ``locks`` serialises commits in lock mode, ``maintenance`` rolls back, collects leftovers and reads history.
"""
