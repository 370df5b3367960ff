"""Evaluation of reward models: preference accuracy (VL-RewardBench format) and best-of-n reranking.

Submodules: ``records`` (loading preference records), ``prefs`` (metrics and ``evaluate_prefs``),
``judge`` (an LVLM used as a judge), ``report`` (JSON / markdown output), ``cli`` (``vlrm-rlhf eval``).
Kept import-free so importing one submodule never pulls in the others.
"""
