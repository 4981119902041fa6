"""Moved to ``edgecl.formats.merge`` (the host's `edgecl apply` needs it too, and no side imports
another). Kept as a re-export for one version."""

from edgecl.formats.merge import (  # noqa: F401
    DEFAULT_MAX_SHARE,
    MAX_SAMPLES_SEEN,
    STRATEGIES,
    MergeError,
    MergeInput,
    MergeOptions,
    MergeOutput,
    MergeResult,
    MergeStrategy,
    WeightedMean,
    capped_shares,
    get_strategy,
    latest_per_device,
    merge_deltas,
    merge_prototypes,
    update_overlap,
)
