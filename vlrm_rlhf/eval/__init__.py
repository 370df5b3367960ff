"""Evaluation of reward models: preference accuracy (VL-RewardBench format) and best-of-n reranking.

Submodules: ``records`` (loading preference records), ``prefs`` (metrics and ``evaluate_prefs``),
``judge`` (an LVLM used as a judge), ``report`` (JSON / markdown output), ``sweep`` (in-memory merge-parameter
sweeps, ``vlrm-rlhf sweep``), ``cli`` (``vlrm-rlhf eval``).
Kept import-free so importing one submodule never pulls in the others.
"""
