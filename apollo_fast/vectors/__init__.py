"""Task vectors: extraction (lazy, fp32), arithmetic, TIES, DARE, application, safetensors I/O.

Public API:
    TaskVector            lazy name -> fp32 tensor mapping; + - * negation, save/load, apply_to
    extract_task_vector   tau = finetuned - base from models, state dicts or checkpoint folders
    add_vectors           weighted sum of task vectors
    apply_task_vectors    W <- W + sum c_i tau_i on a model, in place
    apply_to_checkpoint   the same, streamed from a checkpoint folder to a new one
    ties_merge            TIES-merging (trim / elect sign / disjoint mean / lambda)
    dare                  DARE drop-and-rescale (seeded), composable with ties_merge
    ties_reference, dare_reference, kth_largest_magnitude   the per-tensor math
"""

from .apply import apply_to_checkpoint
from .merge import dare, dare_reference, kth_largest_magnitude, model_trim_thresholds, ties_merge, ties_reference
from .sources import SafetensorsSource, StateDictSource, model_identity, open_source
from .task_vector import VOCAB_POLICIES, TaskVector, add_vectors, apply_task_vectors, extract_task_vector

__all__ = [
    "TaskVector",
    "extract_task_vector",
    "add_vectors",
    "apply_task_vectors",
    "apply_to_checkpoint",
    "ties_merge",
    "dare",
    "ties_reference",
    "dare_reference",
    "kth_largest_magnitude",
    "model_trim_thresholds",
    "model_identity",
    "open_source",
    "SafetensorsSource",
    "StateDictSource",
    "VOCAB_POLICIES",
]
