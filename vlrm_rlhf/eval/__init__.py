"""Evaluation of reward models: preference accuracy (VL-RewardBench format) and best-of-n reranking.

Submodules: ``records`` (loading preference records), ``formats`` (other benchmarks' columns mapped to
VL-RewardBench's), ``prefs`` (metrics, ACC+ and ``evaluate_prefs``), ``judge`` (an LVLM's likelihoods as a judge),
``genjudge`` (preference accuracy of a generative judge), ``report`` (JSON / markdown output), ``sweep`` (in-memory merge-parameter
sweeps, ``vlrm-rlhf sweep``), ``cli`` (``vlrm-rlhf eval``).
Kept import-free so importing one submodule never pulls in the others.
"""
