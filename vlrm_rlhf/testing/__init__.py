"""Test and demo support: :mod:`vlrm_rlhf.testing.zoo` fabricates tiny related checkpoints
(base LM, LVLM, text RM, LLM) for every supported LVLM family, without hub access."""
